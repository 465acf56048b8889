"""A run SIGKILLed mid-epoch, or stopped by a scheduler's signal, and resumed ends bit-identical to the run that was
never stopped (CPU, fp32, loader workers), for the folder, FFCV and DALI formats: same data order, augmentations,
masks, EMA schedule and random streams."""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, finish, kill_when, newest_step

STEPS = 30  # an epoch of the digits is 22 batches at batch 64: the kills fall in both epochs


def _cmd(data: Path, out: Path, *extra: str, steps: int = STEPS, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "ddmim", "train", "--data", str(data), "--preset", "tiny", "--out", str(out),
            "--max-steps", str(steps), "--no-progress", "--workers", str(workers), "--set", "train.ckpt_every_steps=1",
            "--set", "train.keep_checkpoints=2", "--set", "train.report_every=0", *extra]


def _final_state(run: Path, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Every tensor of the final checkpoint that training changes: weights, teacher, optimiser moments."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == steps
    tensors = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
    for i, state in enumerate(ckpt["optimizer_states"]):
        for param, moments in state["state"].items():
            tensors.update({f"optim{i}.{param}.{k}": v for k, v in moments.items() if torch.is_tensor(v)})
    return tensors


def _assert_identical(whole: dict[str, torch.Tensor], killed: dict[str, torch.Tensor], context: str = "") -> None:
    assert whole.keys() == killed.keys() and len(whole) > 100
    differ = [k for k in whole if not torch.equal(whole[k], killed[k])]
    assert not differ, f"{len(differ)} of {len(whole)} tensors differ{context}: {differ[:5]}"


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory):
    """The final state of the run never stopped, per data path, run once for the tests of this module (the
    checkpoint cadence changes no training value)."""
    states: dict[Path, dict[str, torch.Tensor]] = {}

    def state(data: Path) -> dict[str, torch.Tensor]:
        if data not in states:
            out = tmp_path_factory.mktemp("whole")
            finish(_cmd(data, out))
            states[data] = _final_state(out)
        return states[data]
    return state


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["folder", "ffcv", "dali"])
def test_a_run_killed_at_three_steps_ends_as_the_run_never_stopped(fmt, sample_root, request, never_stopped,
                                                                   tmp_path):
    data = sample_root if fmt == "folder" else request.getfixturevalue(f"digits_{fmt}")
    out = tmp_path / "killed"
    resumed_at = []
    # each stopped once a checkpoint of that step is complete: killed, or stopped by a scheduler's signal (which
    # saves the step it ends and exits 128 + the signal)
    for attempt, (step, stop) in enumerate(((5, signal.SIGKILL), (17, signal.SIGTERM), (26, signal.SIGUSR1))):
        cmd = _cmd(data, out, *(["--resume", "auto"] if attempt else []))
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert kill_when(proc, lambda: newest_step(out / "checkpoints") >= step, deadline_s=900, stop=stop), step
        assert proc.returncode == (-stop if stop == signal.SIGKILL else 128 + stop), (step, proc.returncode)
        resumed_at.append(newest_step(out / "checkpoints"))
    assert "resuming from" in finish(_cmd(data, out, "--resume", "auto"))

    _assert_identical(never_stopped(data), _final_state(out), f" after resuming at {resumed_at}")


DDP_STEPS = 16


@pytest.mark.slow
def test_a_two_rank_dali_run_killed_twice_ends_as_the_run_never_stopped(digits_dali, tmp_path):
    """2 gloo ranks on DALI shards: each rank's DALI checkpoint is gathered into the step checkpoint, so a
    resumed rank starts its own part of the epoch where it stopped. After the stop by a signal, the launcher's
    whole process group is killed, as a scheduler's SIGKILL of the job would."""
    def cmd(out: Path, *extra: str) -> list[str]:
        return _cmd(digits_dali, out, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                    "--set", "train.batch_size=32", *extra, steps=DDP_STEPS, workers=1)

    finish(cmd(tmp_path / "whole"))
    out = tmp_path / "killed"
    # the first stop a scheduler's SIGTERM to the launching rank (both ranks save the step they agree on), the
    # second a kill
    for attempt, (step, stop) in enumerate(((4, signal.SIGTERM), (11, signal.SIGKILL))):
        proc = subprocess.Popen(cmd(out, *(["--resume", "auto"] if attempt else [])), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert kill_when(proc, lambda: newest_step(out / "checkpoints") >= step, deadline_s=900, stop=stop), step
            assert proc.returncode == (-stop if stop == signal.SIGKILL else 128 + stop), (step, proc.returncode)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # rank 1, which Lightning's launcher started
    assert "resuming from" in finish(cmd(out, "--resume", "auto"))

    _assert_identical(*(_final_state(run, DDP_STEPS) for run in (tmp_path / "whole", out)))


@pytest.mark.slow
def test_a_run_killed_after_its_end_of_epoch_checkpoint_ends_as_the_run_never_stopped(sample_root, never_stopped,
                                                                                   tmp_path):
    """Checkpoints once an epoch (the default): Lightning restarts from one with its epoch count one ahead, and
    the folder loader, which trusted that count, trained the next epoch's order in place of this one's (FFCV
    and DALI take the epoch from the step)."""
    def cmd(*extra: str) -> list[str]:
        return [*_cmd(sample_root, tmp_path, *extra), "--set", "train.ckpt_every_steps=0"]  # the later value wins

    proc = subprocess.Popen(cmd(), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: newest_step(tmp_path / "checkpoints") > 0)
    assert newest_step(tmp_path / "checkpoints") == 22  # the end of the first epoch
    assert "resuming from" in finish(cmd("--resume", "auto"))

    _assert_identical(never_stopped(sample_root), _final_state(tmp_path))


ACC_STEPS = 10  # 3 micro-batches a step: DALI's 22 batches an epoch end in a step of one batch


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["folder", "dali"])  # FFCV's position: tests/test_ffcv_resume.py
def test_a_run_accumulating_micro_batches_killed_and_resumed_ends_as_the_run_never_stopped(fmt, sample_root, request,
                                                                                           tmp_path):
    """Under accumulation checkpoints fall at step ends only, and each loader resumes at the micro-batch after
    the step (the DALI reader's state is kept per step), including across an epoch whose last step is short."""
    data = sample_root if fmt == "folder" else request.getfixturevalue(f"digits_{fmt}")

    def cmd(out: Path, *extra: str) -> list[str]:
        return _cmd(data, out, "--set", "train.accumulate=3", "--set", "ema.every=2", *extra, steps=ACC_STEPS)

    finish(cmd(tmp_path / "whole"))
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: newest_step(out / "checkpoints") >= 5, deadline_s=900)
    assert "resuming from" in finish(cmd(out, "--resume", "auto"))

    _assert_identical(*(_final_state(run, ACC_STEPS) for run in (tmp_path / "whole", out)))
