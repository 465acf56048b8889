"""Checkpoints that are complete or absent, and finding the newest one to resume from.

Lightning writes through an fsspec transaction whose temporary file lives in the system temp folder;
when that is another filesystem than the run folder, the final move is a copy, and a kill during it
leaves a truncated checkpoint under the final name. Here the temporary file sits beside the target
and is renamed over it, which is atomic on POSIX filesystems.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from ddmim.atomic import TMP_MARK, atomic_write, point_at
from ddmim.checkpoints import (
    DIGEST_KEY,
    FORMAT,
    FORMAT_KEY,
    NewerCheckpoint,
    checkpoint_kind,
    payload_digest,
    read_checkpoint,
)
from ddmim.errors import UserError, is_full_disk

STEP_PREFIX = "step"  # recent checkpoints are named step<8 digits>.ckpt
LAST = "last.ckpt"  # a symlink to the newest step checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic writes; after each, only the `keep` newest `step*.ckpt` files stay. The pruning is by file name
    rather than by Lightning's top-k bookkeeping, which forgets files a killed run wrote after the checkpoint
    a resumed run starts from."""

    def __init__(self, keep: int = 0):
        super().__init__()
        self.keep = keep

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint[FORMAT_KEY] = FORMAT
        checkpoint[DIGEST_KEY] = payload_digest(checkpoint)  # checked whenever the file is read
        try:
            with atomic_write(path, "wb", fsync=True) as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError
            raise UserError(f"writing checkpoint {path} failed ({write_failure(exc, path.parent)}); "
                            f"{earlier_checkpoints(path)}") from None
        if self.keep > 0:
            for old in sorted(path.parent.glob(f"{STEP_PREFIX}*.ckpt"))[:-self.keep]:
                old.unlink(missing_ok=True)


class StepCheckpoints(ModelCheckpoint):
    """Lightning's periodic checkpoints with `save_last="link"`: last.ckpt is a symlink to the step checkpoint
    just written, not a second copy (a Swin-T run's checkpoint is 677 MiB, written at every save), replaced
    in one rename, where Lightning deletes the old link before making the new one (private method, checked
    against pytorch-lightning 2.6.6)."""

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key (Lightning's includes the class name): the state that checkpoints written before
        this class existed keep for it is restored into it, and the reverse."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        link, target = Path(linkpath), Path(filepath)
        if trainer.is_global_zero and target.resolve() != link.resolve() and not _links_later(link, target):
            point_at(link, target)
        trainer.strategy.barrier()


def _links_later(link: Path, target: Path) -> bool:
    """Whether `link` already names a later step checkpoint than `target`: Lightning links last.ckpt again at each
    validation's end, to its own newest file, which a stop's or the run's last step's checkpoint may follow."""
    if not (link.is_symlink() and link.exists() and target.name.startswith(STEP_PREFIX)):
        return False
    current = os.readlink(link)
    return current.startswith(STEP_PREFIX) and current > target.name  # step<8 digits>: the names sort as steps


def save_step_checkpoint(trainer, folder: Path) -> Path:
    """Writes this step's checkpoint outside the periodic ones (a stop, a run's last step) and points last.ckpt
    at it."""
    path = Path(folder) / f"{STEP_PREFIX}{trainer.global_step:08d}.ckpt"
    trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
    if trainer.is_global_zero:
        point_at(path.parent / LAST, path)
    return path


def write_failure(exc: BaseException, folder: Path) -> str:
    """What went wrong, in words: torch.save's zip writer reports a full disk as '[enforce fail at
    inline_container.cc:...] unexpected pos' or 'file write failed', without the system's reason."""
    if is_full_disk(exc):
        return f"{exc.strerror}: the disk is full, or a file-size limit was reached"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "unexpected pos" in text or "file write failed" in text:
        free = shutil.disk_usage(folder).free
        return f"the disk is full, or a file-size limit was reached ({free / 2**20:.0f} MiB free there)"
    return text


def earlier_checkpoints(path: Path) -> str:
    others = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path and TMP_MARK not in p.name)
    if not others:
        return "no earlier checkpoint of this run exists"
    return f"the checkpoints already on disk are intact ({', '.join(others[:4])}{', ...' if len(others) > 4 else ''})"


def is_loadable(path: Path) -> bool:
    return unusable(path) is None


def _read(path: Path) -> tuple[str | None, str | None]:
    """(Why a checkpoint cannot be resumed from (it does not load, or it is damaged), or None; its kind)."""
    try:
        return None, checkpoint_kind(read_checkpoint(path))
    except NewerCheckpoint:
        raise  # sound, and not this ddmim's to set aside: the run needs the newer ddmim
    except UserError as exc:  # a checkpoint that does not load is not one to resume from
        return str(exc), None


def unusable(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (it does not load, or it is damaged), or None."""
    return _read(path)[0]


def recorded_step(path: Path) -> int | None:
    """The training step a checkpoint records (read through a memory map: its tensors are not read); None for a
    file that does not load."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # any file that is not a readable checkpoint
        return None


def _newest_first(path: Path) -> tuple:
    """By the step each checkpoint records, not by file time (a copy or a `touch` would reorder those); a file
    that does not load comes first, to be found unreadable and set aside when an older one loads."""
    step = recorded_step(path)
    return (step is not None, -(step or 0), -path.stat().st_mtime_ns)


def _newest_first_checkpoints(folder: Path) -> list[Path]:
    """Without a last.ckpt whose step checkpoint was pruned before the link moved on (a kill between the two):
    a link to nothing is no checkpoint, and the next save points it again."""
    return sorted((p for p in folder.glob("*.ckpt") if TMP_MARK not in p.name and p.exists()), key=_newest_first)


def resume_checkpoint(folder: Path, *, announce: bool = True, kind: str | None = None) -> Path | None:
    """The checkpoint in `folder` of the latest recorded step that loads; None for a folder without any.

    A folder whose checkpoints all fail to load is refused, naming them: starting over there would silently
    drop the run. Unreadable checkpoints newer than the one chosen are renamed to *.unreadable (kept, but out
    of the way of the pruning of recent checkpoints, which goes by name). `announce`: say what was done
    (rank 0); other ranks only look. `kind`: the one that loads must be of this kind (pretrain, finetune)."""
    folder = Path(folder)
    candidates = _newest_first_checkpoints(folder)
    if not candidates:
        if announce:
            print(f"no checkpoint found in {folder}, starting from step 0")
        return None
    unreadable = []
    for path in candidates:
        why, found = _read(path)
        if why is None and kind is not None and found != kind:
            what = f"a {found}" if found else "not a ddmim"
            raise UserError(f"--resume auto: the newest checkpoint in {folder}, {path.name}, is {what} checkpoint, "
                            f"and this is a {kind} run; move it out of the folder to resume from the one before")
        if why is not None:
            unreadable.append((path, why.split(": ", 1)[-1] if "damaged" in why else "it does not load"))
            continue
        if unreadable and announce:
            for bad, _ in unreadable:
                bad.rename(bad.with_name(bad.name + ".unreadable"))
            print("set aside unreadable checkpoints (renamed *.unreadable): "
                  + "; ".join(f"{p.name} ({why})" for p, why in unreadable))
        return path
    raise UserError(f"--resume auto: none of the checkpoints in {folder} can be read "
                    f"({', '.join(p.name for p, _ in unreadable)}); move them away to start the run over")


def usable_weights(path: Path) -> bool:
    """Whether a checkpoint loads and every weight tensor's squares still sum to a finite float32: a blown-up
    run's weights (1e29, say) are finite, yet any layer norm or product of them overflows."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    except Exception:  # any file that is not a readable checkpoint
        return False
    return all(bool(torch.isfinite(t.float().square().sum())) for t in state.values()
               if torch.is_tensor(t) and t.is_floating_point())


def last_usable_checkpoint(folder: Path) -> str:
    """The checkpoint of the latest recorded step with `usable_weights`, in words, for a message."""
    for path in _newest_first_checkpoints(Path(folder)):
        if usable_weights(path):
            return f"{path} (step {recorded_step(path)})"
    return "none with usable weights"


def rng_state() -> dict:
    """Every random generator this process draws from, so a resumed run continues the same streams: CUDA's of
    this process's device only (a rank of a data-parallel run owns one device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so checkpoints stay loadable with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def every_rank_rng_state() -> list[dict]:
    """`rng_state()` of every rank, in rank order (a collective under data-parallel training)."""
    mine = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [mine]
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    return ranks


def restore_rng_state(saved: dict | list[dict], rank: int = 0) -> None:
    """`saved`: `every_rank_rng_state()` (this rank's entry is used; rank 0's where the run had fewer ranks), or one
    state of an earlier version, whose "cuda" holds every device's state of rank 0's process."""
    state = saved if isinstance(saved, dict) else saved[rank if rank < len(saved) else 0]
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # every device of one process: this one's, if that process had it
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
