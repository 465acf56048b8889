"""One global batch on any device count: the accumulation a global batch implies, the folder loader's dealing of
a step's images to (devices x micro-batches) slots, resume positions, and a stop signal held to a step's end."""
import signal
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DistributedSampler

from ddmim.data.resumable import ResumableSampler, resume_position
from ddmim.errors import UserError
from ddmim.train import preemption
from ddmim.train.accumulation import accumulation

SIZE, BATCH = 203, 8


@pytest.mark.parametrize(("global_batch", "batch_size", "accumulate", "processes", "expected"),
                         [(0, 16, 0, 4, 1), (0, 16, 3, 2, 3), (64, 16, 0, 1, 4), (64, 16, 0, 2, 2), (64, 8, 0, 8, 1),
                          (64, 16, 2, 2, 2)])
def test_the_global_batch_sets_the_micro_batches_per_step(global_batch, batch_size, accumulate, processes, expected):
    assert accumulation(global_batch, batch_size, accumulate, processes) == expected


def test_a_global_batch_no_device_count_reaches_is_one_clear_refusal():
    with pytest.raises(UserError, match=r"global_batch=100 is not reachable on 3 process\(es\).*nor does any"):
        accumulation(100, 16, 0, 3)
    with pytest.raises(UserError, match=r"per-device batches that do: 50, 25, 10, 5"):
        accumulation(100, 16, 0, 2)
    with pytest.raises(UserError, match=r"train.accumulate=3 and train.global_batch=64 disagree"):
        accumulation(64, 16, 3, 2)


def _steps(world: int, accumulate: int, trained: int = 0, epoch: int = 0, batch: int = BATCH) -> list[list[int]]:
    """The images of each optimiser step of an epoch, over every rank and micro-batch, in slot order."""
    per_rank = []
    for rank in range(world):
        sampler = ResumableSampler(range(SIZE), num_replicas=world, rank=rank, seed=3, batch_size=batch,
                                   accumulate=accumulate, trained_steps=lambda: trained + epoch * 6)
        indices = [i for i, _ in sampler]
        per_rank.append([indices[k:k + batch * accumulate] for k in range(0, len(indices), batch * accumulate)])
    return [sum((rank[s] for rank in per_rank), []) for s in range(len(per_rank[0]))]


def test_a_step_trains_the_same_images_on_any_devices_times_accumulation():
    reference = _steps(4, 1)
    assert len(reference) == 6  # 203 images in steps of 4 x 8: 6 steps, the last 11 images left out
    for world, accumulate in ((1, 4), (2, 2)):
        assert _steps(world, accumulate) == reference, (world, accumulate)
    assert _steps(1, 2) != _steps(1, 4)[:len(_steps(1, 2))]  # a control: another global batch deals otherwise
    assert _steps(1, 4, epoch=1) != reference  # and each epoch is shuffled anew


def test_a_step_trains_the_same_images_whatever_the_per_device_batch():
    reference = [sorted(step) for step in _steps(4, 1)]  # 4 x 8: 6 steps of 32 of the 203 images, 11 left out
    # 32 slots of 1: DistributedSampler's padding of 203 to 224 made a 7th step, of 11 images trained twice
    for world, accumulate, batch in ((1, 1, 32), (2, 1, 16), (1, 2, 16), (2, 4, 4), (32, 1, 1)):
        assert [sorted(step) for step in _steps(world, accumulate, batch=batch)] == reference, (world, batch)
    for trained in (1, 4):  # a resume with another per-device batch goes on with the steps not yet trained
        assert sum(_steps(1, 1, trained, batch=32), []) == sum(_steps(1, 1, batch=32)[trained:], [])
        assert sorted(sum(_steps(2, 1, trained, batch=16), [])) == sorted(sum(reference[trained:], []))


def test_without_accumulation_the_order_is_distributed_samplers_so_earlier_runs_resume_as_they_were():
    for rank in range(2):
        plain = DistributedSampler(range(SIZE), num_replicas=2, rank=rank, shuffle=True, seed=3)
        plain.set_epoch(1)
        ours = ResumableSampler(range(SIZE), num_replicas=2, rank=rank, seed=3, batch_size=BATCH,
                                trained_steps=lambda: 12)  # 12 steps of 12 a epoch: epoch 1's start
        expected = list(plain)[:len(plain) // BATCH * BATCH]
        assert [i for i, _ in ours] == expected


def test_a_resumed_epoch_goes_on_at_the_micro_batch_after_the_last_step():
    whole = sum(_steps(2, 2), [])
    for trained in (1, 4):
        assert sum(_steps(2, 2, trained), []) == whole[trained * 2 * 2 * BATCH:]


def test_an_epoch_whose_batches_do_not_fill_its_last_step_counts_that_step():
    # 22 batches in steps of 3: 7 full steps and one of a single batch (Lightning steps on an epoch's last batch)
    assert resume_position(7, 22, 3) == (0, 21)
    assert resume_position(8, 22, 3) == (1, 0)
    assert resume_position(13, 22, 3) == (1, 15)
    assert resume_position(13, 22, 1) == (0, 13)


class _Trainer(SimpleNamespace):
    """What the stop callback reads of a one-process trainer accumulating `accumulate` batches a step."""

    def __init__(self, accumulate: int):
        super().__init__(world_size=1, global_step=0, ready=0, accumulate=accumulate, saved=[], is_global_zero=True)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(_should_accumulate=self._accumulating))

    def _accumulating(self) -> bool:
        return self.ready % self.accumulate != 0

    def save_checkpoint(self, path) -> None:
        path.write_bytes(b"a checkpoint")
        self.saved.append((path.name, self.global_step))

    def batch(self, callback) -> None:
        self.ready += 1
        self.global_step += not self._accumulating()
        callback.on_train_batch_end(self, None, None, None, self.ready - 1)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_a_stop_signal_mid_step_is_acted_on_at_the_steps_last_micro_batch(accumulate, tmp_path):
    callback, trainer = preemption.Preemption(tmp_path), _Trainer(accumulate)
    trainer.batch(callback)  # step 1's first micro-batch (all of it, without accumulation)
    callback._asked(signal.SIGTERM, None)  # the handler the callback installs while training runs
    callback._asked(signal.SIGUSR1, None)  # a second signal changes nothing
    try:
        with pytest.raises(SIGTERMException):
            for _ in range(accumulate):
                trainer.batch(callback)
                assert not trainer.saved  # not mid-step
        step = trainer.global_step
        assert trainer.ready % accumulate == 0 and step == (2 if accumulate == 1 else 1)  # a whole step
        name = f"step{step:08d}.ckpt"
        assert trainer.saved == [(name, step)] and (tmp_path / "last.ckpt").resolve() == tmp_path / name
        assert preemption.STOPPED == {"signal": signal.SIGTERM, "step": step, "checkpoint": str(tmp_path / name)}
    finally:
        preemption.STOPPED.clear()


def test_a_signal_landing_during_the_ranks_agreement_waits_for_the_next_step(monkeypatch, tmp_path):
    """Rank 0's part of the all-reduce was sent without a stop, and the signal's handler ran before the call
    returned: every rank decides on the reduced flags, so this rank goes on with the others, and all stop at the
    next step's end."""
    callback = preemption.Preemption(tmp_path)
    trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    sent = []

    def all_reduce(flag, op):  # the other rank was not signalled either
        sent.append(int(flag.item()))
        callback._asked(signal.SIGTERM, None)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert not callback._agreed(trainer) and sent == [0]
    assert callback._agreed(trainer) and sent == [0, signal.SIGTERM]
    assert callback.signal == signal.SIGTERM


def _resumed(format_: str, saved: tuple[int, int, int], now: tuple[int, int, int]) -> dict:
    """A checkpoint of step 3 written on saved = (per-device batch, processes, micro-batches), loaded on now."""
    from ddmim.train.base_module import ACCUMULATE_KEY, BATCH_KEY, PROCESSES_KEY, TrainingModule

    counts = {"ready": 3 * saved[2], "started": 3 * saved[2], "processed": 3 * saved[2], "completed": 3 * saved[2] - 1}
    progress = {"current": dict(counts), "total": dict(counts)}
    checkpoint = {BATCH_KEY: saved[0], PROCESSES_KEY: saved[1], ACCUMULATE_KEY: saved[2],
                  "loops": {"fit_loop": {"epoch_loop.batch_progress": progress}}}
    module = TrainingModule(max_bad_steps=1, check_every=1)
    data = SimpleNamespace(data_format=format_.split("-")[0], train_size=100, spec=SimpleNamespace(batch_size=now[0]),
                           resumes_split_otherwise=format_ != "ffcv-quasi_random")
    module._trainer = SimpleNamespace(world_size=now[1], accumulate_grad_batches=now[2], datamodule=data)
    module.on_load_checkpoint(checkpoint)
    return checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]


def test_runs_resume_split_otherwise_at_the_same_global_batch():
    assert _resumed("folder", (32, 2, 1), (32, 1, 2)) == {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    assert _resumed("folder", (16, 1, 4), (16, 2, 2)) == {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    assert _resumed("ffcv", (32, 2, 1), (32, 1, 2)) == {"ready": 6, "started": 6, "processed": 6, "completed": 5}
    assert _resumed("folder", (16, 1, 4), (64, 1, 1)) == {"ready": 3, "started": 3, "processed": 3, "completed": 2}
    assert _resumed("ffcv", (32, 2, 1), (64, 1, 1))["ready"] == 3  # another per-device batch: nothing to recount
    assert _resumed("dali", (32, 2, 1), (32, 1, 2))["ready"] == 6  # the rest of the epoch dealt anew
    assert _resumed("dali", (32, 2, 1), (16, 2, 2))["ready"] == 6
    with pytest.raises(UserError, match=r"global batch is 32 x 2 process\(es\) x 1 .* = 64 .* 32 x 1 process"):
        _resumed("folder", (32, 2, 1), (32, 1, 1))
    with pytest.raises(UserError, match=r"in batches of 32 .* in batches of 16.*quasi_random.*train.batch_size=32"):
        _resumed("ffcv-quasi_random", (32, 1, 1), (16, 1, 2))


def test_an_unreachable_global_batch_is_one_line_and_leaves_no_run_folder(sample_root, tmp_path, capsys):
    from ddmim.cli import main

    code = main(["train", "--data", str(sample_root), "--preset", "tiny", "--set", "train.global_batch=100",
                 "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.global_batch=100 is not reachable on 1 process" in err[0], err
    assert not (tmp_path / "run").exists()
