"""A run SIGKILLed mid-epoch, or stopped by a scheduler's signal, and resumed ends bit-identical to the run that was
never stopped (CPU, fp32, loader workers), for the folder, FFCV and DALI formats: same data order, augmentations,
masks, EMA schedule and random streams."""
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, finish, kill_when, newest_step, run, train_steps

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


# records each DALI training step's samples (ordinals of the split), per segment and rank
RECORDING_DALI_LAUNCH = """
import json, os, sys
from ddmim.data import dali_epoch, dali_loader
from ddmim.cli import main

pending = []
plain_add, plain_remember = dali_epoch.EpochLog.add, dali_loader.DaliLoader._remember

def add(self, ordinals):
    pending.extend(ordinals.tolist())
    plain_add(self, ordinals)

def remember(self, epoch_done):
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    with open(os.path.join(os.environ["RECORD_DIR"], f"{os.environ['SEGMENT']}rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"step": self.consumed, "samples": pending}) + "\\n")
    pending.clear()
    plain_remember(self, epoch_done)

dali_epoch.EpochLog.add, dali_loader.DaliLoader._remember = add, remember
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_dali_run_resumed_on_another_process_count_trains_the_rest_of_its_epoch(before, after, digits_dali,
                                                                                  tmp_path):
    """A requeued DALI job that gets another GPU count: DALI had dealt each rank its own shards, so the resumed
    run trains the samples no rank had trained in that epoch, each once, dealt anew over its ranks at the same
    global batch (2 x 32 as 1 process x 2 micro-batches or 2 processes x 1), and the epoch ends within its length
    on the new count (1442 images in batches of 32: what is short of a batch per rank is left out, as by a run
    never stopped)."""
    batch, record, out = 32, tmp_path / "record", tmp_path / "run"
    record.mkdir()
    launch = tmp_path / "launch.py"
    launch.write_text(RECORDING_DALI_LAUNCH)

    def cmd(devices: int, steps: int, *extra: str) -> list[str]:
        return [sys.executable, str(launch), *_cmd(digits_dali, out, "--devices", str(devices), "--accelerator", "cpu",
                                                   "--strategy", "ddp" if devices > 1 else "auto",
                                                   "--set", f"train.batch_size={batch}",
                                                   "--set", f"train.global_batch={2 * batch}",
                                                   "--set", "train.log_every=1", *extra, steps=steps, workers=1)[3:]]

    env = {**ENV, "RECORD_DIR": str(record)}
    proc = subprocess.Popen(cmd(before, 30), cwd=REPO, env={**env, "SEGMENT": "a-"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert kill_when(proc, lambda: newest_step(out / "checkpoints") >= 5, deadline_s=900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1, which Lightning's launcher started
    killed_at = newest_step(out / "checkpoints")
    rest = (1442 - killed_at * 2 * batch) // batch // after * after  # micro-batches of 32 left, whole per rank
    end = killed_at + -(-rest // 2)  # one process: the epoch's last step is one micro-batch when `rest` is odd
    done = run(cmd(after, end + 1, "--resume", "auto"), env={**env, "SEGMENT": "b-"})  # and a step of the next epoch
    assert done.returncode == 0 and "resuming from" in done.stdout, done.stderr[-2000:]

    def recorded(name: str) -> list[tuple[int, list[int]]]:
        return [(row["step"], row["samples"]) for row in map(json.loads, (record / name).read_text().splitlines())]

    trained = [i for r in range(before) for step, samples in recorded(f"a-rank{r}.jsonl") if step <= killed_at
               for i in samples]
    resumed = [recorded(f"b-rank{r}.jsonl") for r in range(after)]
    assert all([step for step, _ in steps] == list(range(killed_at + 1, end + 2)) for steps in resumed)
    across = trained + [i for steps in resumed for step, samples in steps if step <= end for i in samples]
    assert len(trained) == killed_at * 2 * batch and len(across) == (2 * killed_at + rest) * batch
    assert len(set(across)) == len(across) and set(across) <= set(range(1442))  # each sample once
    assert 1442 - len(across) < 2 * batch  # the epoch's tail short of a step, left out
    following = [i for steps in resumed for i in steps[-1][1]]  # the next epoch: all samples again
    assert len(following) == 2 * batch and set(following) & set(across)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["world_size"], summary["global_batch"]) == (end + 1, after, 2 * batch)
    assert train_steps(out) == list(range(end + 1))  # each step's row once
