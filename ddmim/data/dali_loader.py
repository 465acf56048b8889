"""DALI data (a split as `dali_format` describes it) through the pipeline of `dali_pipeline`: the loader keeps
the iteration, the samples left out and the resume state.

Batches mix classes because the converter shuffles the samples before cutting shards; the reader's
shuffle buffer then only has to vary the order between epochs. Under data-parallel training DALI gives
each rank its own part of the samples (`shard_id`/`num_shards`) and moves every rank on to the next part
after each epoch (`stick_to_shard=False`); the ranks agree on each epoch's batch count (parts can differ by a
sample).

Before DALI reads a shard, the loader leaves out the samples whose JPEG header is malformed (some header
damage crashes DALI's native decoder) or whose bytes fail the converter's checksum (DALI decodes damaged
compressed data into grey or shifted blocks without an error): `dali_repair.damaged_samples`. Any other
JPEG that does not decode fails the whole DALI batch; the loader then finds every such sample of the split
(`dali_repair.undecodable_samples`), leaves them out through filtered copies of the indexes, and goes on with
the epoch.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import torch

from ddmim.data.bad_samples import SkippedSamples
from ddmim.data.dali_epoch import EpochLog, SampleOrdinals, union_of
from ddmim.data.dali_format import HOST_LABELS, Shards, list_shards, sample_count
from ddmim.data.dali_pipeline import READER, build_pipeline
from ddmim.data.dali_repair import (
    damaged_samples,
    filtered_shards,
    ranks_sharing_cores,
    undecodable_samples,
    usable_cores,
)
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.rank_exchange import RankExchange
from ddmim.errors import UserError, say


class DaliLoader:
    """A DALI pipeline as a re-iterable of (images, labels) batches with a length, for Lightning.

    `make_pipe(shards)` builds the pipeline, over the given (tars, filtered indexes) or, with None, the
    folder's own shards. When a batch fails to decode, the split is searched for the samples that cannot be
    decoded; they are recorded in `skipped`, the pipeline is rebuilt without them, and the epoch goes on.

    Under data-parallel training (`group`, a gloo group of every rank) a rank whose batch failed repairs its
    pipeline at once and says so in an all-reduce that runs while the step trains, read at the next batch (after
    DDP's gradient all-reduce, so it does not wait). Then every rank takes the union of what the failing ranks
    found and rebuilds its pipeline over the same sample list at that step, keeping the epoch's batch count."""

    def __init__(self, make_pipe, *, train: bool, channels_last: bool, folder: Path, skipped: SkippedSamples,
                 group=None, accumulate: int = 1, batch: int = 0, labels: np.ndarray | None = None):
        self.make_pipe, self.train, self.channels_last = make_pipe, train, channels_last
        self.accumulate, self.batch = accumulate, batch  # training batches per optimiser step; images per batch
        self.labels = labels  # each sample's label by its ordinal, for a view whose shards hold none (`dali_view`)
        self.samples = SampleOrdinals(list_shards(folder)) if train or labels is not None else None
        self.log = EpochLog(self.samples.size) if train else None  # what this epoch trained, on this rank
        self.folder, self.skipped, self.ranks = folder, skipped, RankExchange(group)
        self.left_out: set[str] = set()  # 'SHARD.tar:KEY' of every sample left out so far
        self.shards = self._screened()
        self.iterator = self._iterator()
        self.consumed = 0  # optimiser steps whose batches were yielded, counting those of the run it resumed
        self.resume_done = 0  # batches of the first epoch after a resume that the checkpoint had already trained
        self.states: dict[int, dict] = {}  # consumed -> the state after that step's last batch, for the last few
        self.sent = None  # (whether any rank's last batch failed, in flight; what this rank found)
        self.repaired = False  # a pipeline rebuilt in this epoch: the next epoch starts a pass of its own
        self.epoch_steps = 0  # optimiser steps of the current epoch
        self.resume_trained = None  # the samples the epoch resumed in had trained (a bitmap), for the log
        self.resplit = None  # the epoch a run split otherwise resumed in: see `_resume_resplit`

    def _screened(self) -> Shards | None:
        """The split's shards without the samples whose JPEG header is malformed or whose bytes fail their
        checksum, found before DALI reads any (`dali_repair.damaged_samples`); None when every sample is
        sound. Under data-parallel training each rank checks every world-th shard, with its part of the cores
        that it shares with other ranks, and all ranks take the union, so they go on over one sample list."""
        own = list_shards(self.folder)
        rank, world = self.ranks.rank, self.ranks.world
        mine = (socket.gethostname(), usable_cores())
        share = ranks_sharing_cores(mine, self.ranks.gather(mine)) if self.ranks.shared else 1
        bad = damaged_samples((own[0][rank::world], own[1][rank::world]), own, share=share)
        for entry in bad:
            self.skipped.record(*entry)
        if self.ranks.shared:
            bad = self._union(bad)
        return self._leave_out({where for _, where, _ in bad}) if bad else None

    def _leave_out(self, where: set[str]) -> Shards:
        self.left_out |= where
        shards = filtered_shards(*list_shards(self.folder), self.left_out)
        if not shards[0]:
            raise UserError(f"no sample of {self.folder} can be decoded")
        return shards

    def _iterator(self, checkpoint: str | None = None):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        outputs = (["images", "where"] if self.labels is not None else
                   ["images", "labels", "where"] if self.train else ["images", "labels"])
        return DALIGenericIterator([self.make_pipe(self.shards, checkpoint)], outputs,
                                   reader_name=READER, last_batch_policy=policy, auto_reset=True,
                                   prepare_first_batch=False)

    def _remember(self, epoch_done: int) -> None:
        """Keeps the state after the batch just yielded, a step's last: Lightning asks for it at the step that
        trained that batch, when it may already have fetched the next one."""
        self.states[self.consumed] = {"dali": self.iterator.checkpoints()[0], "epoch_done": epoch_done,
                                      "epoch_steps": self.epoch_steps, "batch": self.batch,
                                      "trained": self.log.mark(), "resplit": self.resplit is not None,
                                      "left_out": sorted(self.left_out), "repaired": self.repaired,
                                      "unsettled": self.sent[1] if self.sent else []}
        self.states.pop(self.consumed - 4, None)

    def state_at(self, step: int) -> dict:
        """What a resume after `step` optimiser steps needs to go on exactly: DALI's own checkpoint of the pipeline
        (reader position, every random stream), how far into its epoch, and the samples left out; one entry per
        rank (a collective under data-parallel training: every rank saves the checkpoint, rank 0 writes it)."""
        state = self.states.get(step)
        if state is not None:
            state = {**state, "trained": self.log.packed(state["trained"])}
        return {"ranks": self.ranks.gather(state)}

    def restore(self, state: dict, step: int) -> None:
        """Goes on from `state_at(step)` of the run resumed from."""
        rank, world = self.ranks.rank, self.ranks.world
        ranks = state.get("ranks") or []
        resplit = len(ranks) != world or any(r and (r.get("batch", self.batch) != self.batch or r.get("resplit"))
                                             for r in ranks)
        if resplit and ranks and all(r and "trained" in r for r in ranks):
            return self._resume_resplit(ranks, step)
        if resplit or ranks[rank] is None:  # a checkpoint of an earlier ddmim, which kept no trained samples
            say(f"ddmim: warning: the checkpoint holds no DALI reader state for rank {rank} of {world} at step "
                f"{step}; the DALI data order starts over")
            return
        mine = ranks[rank]
        if "trained" in mine:
            self.resume_trained = union_of([mine["trained"]], self.samples.size)
        unsettled = {entry[1]: entry for r in ranks if r for entry in r.get("unsettled", [])}
        if unsettled:  # a rank's batch had failed and the ranks had not yet agreed: agree now, as the run would have
            self.skipped.mark(ordinal for ordinal, _, _ in unsettled.values())
            self.shards = self._leave_out(set(mine["left_out"]) | set(unsettled))
            self.iterator, self.repaired = self._iterator(), True
        else:
            if mine["left_out"]:
                self.shards = self._leave_out(set(mine["left_out"]))
            self.iterator, self.repaired = self._iterator(mine["dali"]), mine.get("repaired", False)
        self.consumed, self.resume_done = step, mine["epoch_done"]
        self.epoch_steps = mine.get("epoch_steps", 0)

    def _resume_resplit(self, ranks: list[dict], step: int) -> None:
        """Goes on from a checkpoint of this run split otherwise (another process count or per-device batch, or
        inside an epoch that was): the rest of the epoch is the samples no rank had trained, dealt anew over this
        run's ranks, each once; Lightning's count of the epoch's batches (the steps done x this run's
        micro-batches) and its length on this split are kept, and the next epoch reads the whole split."""
        self.left_out |= {where for r in ranks for where in r["left_out"]}
        self.left_out |= {entry[1] for r in ranks for entry in r.get("unsettled", [])}
        trained = union_of([r["trained"] for r in ranks], self.samples.size)
        self.shards = self._leave_out(set()) if self.left_out else None
        self.iterator = self._iterator()
        length, offset = len(self.iterator), max(r["epoch_steps"] for r in ranks) * self.accumulate
        self.consumed, self.epoch_steps = step, offset // self.accumulate
        rest = filtered_shards(*list_shards(self.folder), self.left_out, trained)
        if offset >= length or sample_count(rest[1]) // self.ranks.world < self.batch:
            self.epoch_steps = 0  # the epoch had ended: the next starts as any
            return
        self.resplit = {"length": length, "offset": offset}
        self.shards, self.resume_trained = rest, trained
        self.iterator = self._iterator()

    def __len__(self) -> int:
        return self.resplit["length"] if self.resplit else len(self.iterator)

    def _find_bad(self, error: RuntimeError) -> list[tuple[int, str, str]]:
        own = list_shards(self.folder)
        bad = undecodable_samples(self.shards or own, own)
        if not bad:
            raise UserError(f"DALI failed on {self.folder} and no sample there fails to decode: "
                            f"{str(error).strip().splitlines()[-1]}") from None
        for ordinal, where, reason in bad:
            self.skipped.record(ordinal, where, reason)
        return bad

    def _repair(self, bad: list[tuple[int, str, str]]) -> None:
        self.shards = self._leave_out({where for _, where, _ in bad})
        if self.resplit:  # the rest of an epoch resumed split otherwise: still without what the epoch trained
            trained = union_of([self.log.packed(self.log.mark())], self.samples.size)
            self.shards = filtered_shards(*list_shards(self.folder), self.left_out, trained)
        self.iterator, self.repaired = self._iterator(), True

    def _union(self, bad: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
        """What every rank found, the same list on every rank."""
        union = {entry[1]: entry for entry in sum(self.ranks.gather(bad), [])}
        self.skipped.mark(ordinal for ordinal, _, _ in union.values())
        return sorted(union.values())

    def _agreed_failures(self) -> list[tuple[int, str, str]]:
        """The samples the ranks found at their previous batch, the same on every rank: [] when none failed."""
        if self.sent is None:
            return []
        (any_failed, bad), self.sent = self.sent, None
        return self._union(bad) if any_failed.wait() else []

    def _next(self, stream):
        """One batch from `stream`; (None, error) when DALI failed to decode it. A pass of the reader that ends
        within an epoch (a rank whose part is a batch longer than another's leaves it unread, so its passes
        and the epochs drift apart) goes on with the next pass."""
        for _ in range(2):
            try:
                return next(stream), None
            except StopIteration:  # auto_reset: the next call starts the next pass
                continue
            except RuntimeError as error:  # DALI's decoders fail the whole batch, naming no sample
                return None, error
        raise UserError(f"DALI's reader of {self.folder} yields no batch")

    def _even(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A validation batch as large as the largest rank's, padded with its own first samples (as
        DistributedSampler pads): a collective over the batch (the contrastive loss gathers every rank's
        features) needs one size on every rank, and only an epoch's last batch can differ, by a sample."""
        missing = self.ranks.max(len(labels)) - len(labels)
        if missing <= 0:
            return images, labels
        repeat = torch.arange(missing, device=labels.device) % len(labels)
        return torch.cat([images, images[repeat]]), torch.cat([labels, labels[repeat]])

    def epoch_batches(self) -> int:
        """Batches of this epoch: the fewest of any rank (one exchange an epoch), so that every rank steps
        as often; DALI gives ranks whose parts differ by a sample different counts."""
        mine = len(self.iterator)
        if self.resplit:  # the rest of an epoch resumed split otherwise, within the epoch's length
            mine = min(mine, self.resplit["length"] - self.resplit["offset"])
        return self.ranks.min(mine)

    def __iter__(self):
        stream = iter(self.iterator)
        total = self.epoch_batches()
        done = self.resume_done if self.resume_done < total else 0  # a checkpoint at an epoch's end: a new one
        if self.log is not None:
            self.log.start(self.resume_trained if done or self.resplit else None)
            self.epoch_steps = self.epoch_steps if done or self.resplit else 0
        self.resume_done, self.resume_trained = 0, None
        for _ in range(total - done):
            agreed = self._agreed_failures()
            if agreed:
                self._repair(agreed)
                stream = iter(self.iterator)
            out, error = self._next(stream)
            bad = self._find_bad(error) if error is not None else []
            if bad:
                self._repair(bad)
                stream = iter(self.iterator)
                out, error = self._next(stream)
                if error is not None:
                    raise UserError(f"DALI failed on {self.folder} again after leaving out the samples that "
                                    f"do not decode: {str(error).strip().splitlines()[-1]}") from None
            if self.ranks.shared:
                self.sent = (self.ranks.any_later(bool(bad)), bad)
            ordinals = self.samples.of(out[0]["where"]) if self.samples is not None else None
            if self.log is not None:
                self.log.add(ordinals)
            images = out[0]["images"]
            labels = (torch.from_numpy(self.labels[ordinals]).to(images.device) if self.labels is not None else
                      out[0]["labels"].reshape(-1).long())
            if self.channels_last:  # HWC batches viewed as NCHW tensors in channels-last memory
                images = images.permute(0, 3, 1, 2)
            if self.ranks.shared and not self.train and done == total - 1:
                images, labels = self._even(images, labels)
            done += 1
            if self.train and (done % self.accumulate == 0 or done == total):  # a step's last batch
                self.consumed += 1
                self.epoch_steps += 1
                self._remember(done)
            yield images, labels
        if self.resplit:  # the next epoch reads the whole split
            self.shards, self.resplit = (self._leave_out(set()) if self.left_out else None), None
            self.repaired = True
        if self.repaired:  # the rebuilt pipeline's pass began mid-epoch: the next epoch starts a pass of its own
            self.iterator, self.repaired = self._iterator(), False
            if self.train:
                self._remember(done)


def open_loader(folder: Path, spec: LoaderSpec, *, train: bool, gpu: bool, channels_last: bool = False,
                skipped: SkippedSamples | None = None, group=None, accumulate: int = 1,
                **pipeline_options) -> DaliLoader:
    """The loader of one split folder; `pipeline_options` go to `build_pipeline` (shard_id, batch_size, ...)."""
    skipped = skipped or SkippedSamples(sample_count(list_shards(folder)[1]))
    labels = np.load(folder / HOST_LABELS) if (folder / HOST_LABELS).is_file() else None

    def make_pipe(shards, checkpoint=None):
        return build_pipeline(folder, spec, train=train, gpu=gpu, channels_last=channels_last, shards=shards,
                              host_labels=labels is not None, enable_checkpointing=train, checkpoint=checkpoint,
                              **pipeline_options)

    return DaliLoader(make_pipe, train=train, channels_last=channels_last, folder=folder, skipped=skipped,
                      group=group, accumulate=accumulate, batch=pipeline_options.get("batch_size") or spec.batch_size,
                      labels=labels)
