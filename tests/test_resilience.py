"""Surviving faults: resume after SIGKILL (also during a checkpoint write), non-finite steps, reproducibility."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import ENV, Growth, kill_when, newest_step, train_steps
from torch.utils.data import DataLoader, TensorDataset

from conftest import QUIET_STEPS
from ddmim.atomic import TMP_MARK
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.train.checkpoint_files import is_loadable, resume_checkpoint
from ddmim.train.nonfinite import NonFiniteTraining
from ddmim.train.pretrain import pretrain
from ddmim.train.pretrain_module import DDMIMModule

REPO = Path(__file__).resolve().parents[1]
PLANNED = 60


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddmim", "train", "--data", str(data), "--preset", "tiny", "--out", str(out),
            "--max-steps", str(PLANNED), "--no-progress", "--set", "train.ckpt_every_steps=4",
            "--set", "train.keep_checkpoints=2", "--set", "data.num_workers=0", "--set", "train.report_every=0",
            "--set", "train.log_every=1", *extra]


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_planned_steps_with_one_continuous_history(sample_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    metrics = Growth(out / "logs" / "metrics.csv")

    def while_writing():
        return any(TMP_MARK in p.name for p in ckpts.glob("*"))

    def after_a_new_checkpoint():
        return newest_step(ckpts) > start_step

    def after_three_more_logged_steps():
        if not metrics():  # read the rows only when the file grew
            return False
        steps = train_steps(out)
        return bool(steps) and steps[-1] >= start_row + 3

    # killed while a checkpoint is being written, once a new checkpoint is complete, and once the step
    # counter has moved: each an observed event, none a guess at how fast this machine is
    kills = []
    for attempt, condition in enumerate([while_writing, after_a_new_checkpoint, after_three_more_logged_steps]):
        start_step = newest_step(ckpts)
        start_row = (train_steps(out) or [0])[-1]
        cmd = _train_cmd(sample_root, out, *(["--resume", "auto"] if attempt else []))
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # a checkpoint is written in a few ms: that window is watched closely, the others at the default pace
        kills.append(kill_when(proc, condition, poll_s=0.001 if condition is while_writing else 0.02))
        for path in ckpts.glob("*.ckpt"):  # nothing under a final name is ever half-written
            assert is_loadable(path), path
    assert kills[0], "the first run was never caught writing a checkpoint"
    done = subprocess.run(_train_cmd(sample_root, out, "--resume", "auto"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    assert "Tip:" not in done.stdout + done.stderr and "LeafSpec" not in done.stderr  # third-party noise
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == PLANNED
    final = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == PLANNED
    assert all(is_loadable(p) for p in ckpts.glob("*.ckpt"))
    assert not [p for p in ckpts.iterdir() if TMP_MARK in p.name]
    assert len([p for p in ckpts.glob("step*.ckpt")]) <= 2  # keep_checkpoints

    # the history of the four runs reads as one: every step once, in order, in the CSV and in TensorBoard
    assert train_steps(out) == list(range(PLANNED))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(PLANNED))


def test_resume_keeps_the_earlier_rows(sample_root, tmp_path):
    base = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(tmp_path / "run"), "--workers",
            "0", "--no-progress", "--set", "train.log_every=1", "--set", "train.ckpt_every_steps=4"]
    assert main([*base, "--max-steps", "8"]) == 0
    assert train_steps(tmp_path / "run") == list(range(8))
    assert main([*base, "--max-steps", "12", "--resume", "auto"]) == 0
    assert train_steps(tmp_path / "run") == list(range(12))
    rows = list(csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("val/loss")][0] == "0"  # the untrained model's loss is still there


def test_resume_with_no_checkpoint_or_only_unreadable_ones(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
            "--no-progress", "--max-steps", "2", "--epochs", "1"]
    assert main(base) == 0
    ckpts = sorted((out / "checkpoints").glob("*.ckpt"))
    for path in ckpts:
        path.write_bytes(path.read_bytes()[:1000])  # truncated: none loads
    mtimes = {p: p.stat().st_mtime_ns for p in ckpts}
    assert main([*base, "--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of the checkpoints" in err and all(p.name in err for p in ckpts) and "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in ckpts} == mtimes  # nothing touched, nothing written
    assert not list((out / "checkpoints").glob("last-v*.ckpt"))

    for path in ckpts:
        path.unlink()
    assert main([*base, "--resume", "auto"]) == 0
    assert "no checkpoint found" in capsys.readouterr().out
    assert is_loadable(out / "checkpoints" / "last.ckpt")


def test_unreadable_newer_checkpoints_are_set_aside(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
            "--no-progress", "--set", "train.ckpt_every_steps=2", "--set", "train.keep_checkpoints=2"]
    assert main([*base, "--max-steps", "4"]) == 0
    newer = out / "checkpoints" / "step00000040.ckpt"  # a killed run's last file, damaged
    newer.write_bytes(b"not a checkpoint")
    (out / "checkpoints" / "last.ckpt").write_bytes(b"also damaged")
    assert main([*base, "--max-steps", "8", "--resume", "auto"]) == 0
    said = capsys.readouterr().out
    assert "set aside unreadable checkpoints" in said and "step00000040.ckpt" in said
    assert (out / "checkpoints" / "step00000040.ckpt.unreadable").read_bytes() == b"not a checkpoint"
    steps = sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt"))
    assert steps == ["step00000006.ckpt", "step00000008.ckpt"]  # the new ones survive the pruning


def test_resume_refuses_what_changes_the_run_and_takes_what_only_runs_it(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--no-progress"]
    assert main([*train, "--max-steps", "1", "--epochs", "1", "--workers", "0"]) == 0
    saved = (out / "config.yaml").read_bytes()
    for changes in (["model.embed_dim=64"], ["optim.lr=0.01", "ema.every=3"], ["train.seed=1"],
                    ["data.hflip=0.5"], ["ddmim.tau=0.1"]):
        code = main([*train, "--resume", "auto", *(f"--set={change}" for change in changes)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert all(change.split("=")[0] in err for change in changes) and "other values" in err, err
        assert (out / "config.yaml").read_bytes() == saved
    # another per-device batch may split the same global batch, not make another one
    code = main([*train, "--resume", "auto", "--set=train.batch_size=32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "global batch is 64 x 1 process(es) x 1 micro-batch(es) = 64" in err, err
    assert (out / "config.yaml").read_bytes() == saved
    fewer = tmp_path / "fewer"
    shutil.copytree(sample_root, fewer)
    for image in sorted((fewer / "train").rglob("*.png"))[:100]:
        image.unlink()
    code = main([*train[:2], str(fewer), *train[3:], "--resume", "auto", "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "trained on 1442 images in folder format and --data gives 1342" in err, err
    (out / "hpc_ckpt_1.ckpt").write_bytes(b"Lightning's SLURM checkpoint of an earlier ddmim")
    # how the run is run, watched and checkpointed may change: more epochs, workers, logging, kernels
    assert main([*train, "--resume", "auto", "--max-steps", "2", "--epochs", "2", "--workers", "1", "--set",
                 "train.log_every=1", "--set", "train.kernels=torch", "--set", "eval.every_epochs=0"]) == 0
    said = capsys.readouterr().out
    assert "resuming from" in said and "set aside Lightning's mid-step SLURM checkpoints" in said
    assert not (out / "hpc_ckpt_1.ckpt").exists() and (out / "hpc_ckpt_1.ckpt.unused").is_file()
    code = main(["train", "--data", str(sample_root), "--resume", "auto"])
    assert code == 2 and "--resume auto needs --out" in capsys.readouterr().err


class _Batches(pl.LightningDataModule):
    def __init__(self, images):
        super().__init__()
        self.images = images

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.images, torch.zeros(len(self.images), dtype=torch.long)), batch_size=4)


def _fit(images, max_bad_steps: int, steps: int, tmp_path, log_every: int = 1):
    # the counters live on the device and are read every log_every steps: by default every step
    cfg = make_config("tiny", [f"train.max_bad_steps={max_bad_steps}", "train.batch_size=4",
                               f"train.log_every={log_every}"])
    module = DDMIMModule(cfg.to_dict())
    before = {k: v.clone() for k, v in module.model.student.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    return module, before, trainer


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    images = torch.randn(16, 3, 32, 32)
    images[4:8, 0, 0, 0] = float("nan")  # the second batch of four
    module, before, trainer = _fit(images, max_bad_steps=5, steps=4, tmp_path=tmp_path)
    trainer.fit(module, datamodule=_Batches(images))
    assert module.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in module.model.student.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in module.model.student.state_dict().items())

    nan_only = torch.full((8, 3, 32, 32), float("nan"))
    module, before, trainer = _fit(nan_only, max_bad_steps=5, steps=2, tmp_path=tmp_path)
    trainer.fit(module, datamodule=_Batches(nan_only))
    assert module.skipped_steps == 2
    assert all(torch.equal(before[k], v) for k, v in module.model.student.state_dict().items())


def test_too_many_non_finite_steps_stop_training(tmp_path):
    nan_only = torch.full((16, 3, 32, 32), float("nan"))
    module, _, trainer = _fit(nan_only, max_bad_steps=3, steps=10, tmp_path=tmp_path)
    message = "stopped at step 2: 3 consecutive non-finite steps; last checkpoint with usable weights: none"
    with pytest.raises(NonFiniteTraining, match=message):
        trainer.fit(module, datamodule=_Batches(nan_only))


def test_the_stop_names_the_latest_checkpoint_whose_weights_are_usable(tmp_path):
    """A blown-up run's checkpoints hold finite but enormous weights (1.25e29 was seen), then NaN ones: the
    message names the one before them."""
    from ddmim.train.checkpoint_files import last_usable_checkpoint

    for step, value in ((4, 0.5), (8, 1.25e29), (12, float("nan")), (16, 2.0)):
        weights = {"w": torch.full((8, 8), value), "steps": torch.tensor(step)}
        torch.save({"global_step": step, "state_dict": weights}, tmp_path / f"step{step:08d}.ckpt")
    assert last_usable_checkpoint(tmp_path) == f"{tmp_path / 'step00000016.ckpt'} (step 16)"  # the control
    (tmp_path / "step00000016.ckpt").unlink()
    assert last_usable_checkpoint(tmp_path) == f"{tmp_path / 'step00000004.ckpt'} (step 4)"
    (tmp_path / "step00000004.ckpt").unlink()
    assert last_usable_checkpoint(tmp_path) == "none with usable weights"


def test_a_run_of_non_finite_steps_between_checks_stops_training(tmp_path):
    """Three bad steps, then a good one, then the check: the run of three is not forgotten."""
    images = torch.randn(16, 3, 32, 32)
    images[:12, 0, 0, 0] = float("nan")
    module, _, trainer = _fit(images, max_bad_steps=3, steps=8, tmp_path=tmp_path, log_every=4)
    with pytest.raises(NonFiniteTraining, match="stopped at step 3: 3 consecutive non-finite steps"):
        trainer.fit(module, datamodule=_Batches(images))
    assert module.skipped_steps == 3


def _train_losses(run: Path) -> list[float]:
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def test_same_seed_gives_identical_first_twenty_losses(sample_root, tmp_path):
    cfg = make_config("tiny", ["train.log_every=1", "data.num_workers=0", "train.epochs=1"])
    for name in ("a", "b"):
        pretrain(cfg, sample_root, tmp_path / name, QUIET_STEPS(20))
    first, second = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert len(first) == 20 and first == second


def _damage_middle(path: Path) -> None:
    """4 KiB of random bytes over the middle of a file, its length unchanged (a bad disk block)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = os.urandom(4096)
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_that_still_loads_is_set_aside(sample_root, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
            "--no-progress", "--set", "train.ckpt_every_steps=2", "--set", "train.keep_checkpoints=3"]
    assert main([*base, "--max-steps", "4"]) == 0
    ckpts = out / "checkpoints"
    for name in ("last.ckpt", "step00000004.ckpt"):
        _damage_middle(ckpts / name)
        torch.load(ckpts / name, weights_only=False)  # the damage is in the tensor data: torch still loads it
    assert main([*base, "--max-steps", "6", "--resume", "auto"]) == 0
    said = capsys.readouterr().out
    assert "set aside unreadable checkpoints" in said and "step00000004.ckpt (its contents differ from the digest" \
        in said
    assert "resuming from" in said and "step00000002.ckpt" in said.split("resuming from", 1)[1].splitlines()[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["val_loss_last"] == summary["val_loss_last"]  # finite, not NaN


def test_a_checkpoint_with_non_finite_weights_is_refused(pretrain_ckpt, tmp_path):
    from ddmim.checkpoints import read_checkpoint
    from ddmim.errors import UserError
    from ddmim.train.checkpoint_files import AtomicCheckpointIO

    ckpt = torch.load(pretrain_ckpt, weights_only=False)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "nan.ckpt")  # a sound file of unsound weights
    with pytest.raises(UserError, match=f"weights hold NaN or infinite values \\({name}"):
        read_checkpoint(tmp_path / "nan.ckpt")


def test_resume_auto_on_a_folder_that_does_not_exist_yet_starts_the_run(sample_root, tmp_path, capsys):
    # SLURM requeue scripts and torchrun --max-restarts run one command for the first launch and every restart
    for out in (tmp_path / "new", tmp_path / "killed-in-its-first-second"):
        if out.name.startswith("killed"):
            out.mkdir()
        assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
                     "--no-progress", "--max-steps", "2", "--epochs", "1", "--resume", "auto"]) == 0
        assert "no checkpoint found" in capsys.readouterr().out
        assert json.loads((out / "summary.json").read_text())["steps"] == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a run")
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(tmp_path / "other"),
                 "--resume", "auto"]) == 2
    assert "holds files but is not a ddmim run folder" in capsys.readouterr().err


def test_resuming_from_an_end_of_epoch_checkpoint_numbers_every_row_as_the_uninterrupted_run(sample_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    base = ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
            "--no-progress", "--set", "train.log_every=1", "--set", "train.report_every=0"]
    assert main([*base, "--max-steps", "22"]) == 0  # one whole epoch of the digits at batch 64: last.ckpt at its end
    assert main([*base, "--max-steps", "30", "--resume", "auto"]) == 0
    assert train_steps(out) == list(range(30))  # step 22 neither missing nor every later one a step too high
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(30))


def test_each_rank_gets_back_its_own_random_streams_and_cuda_only_its_device(monkeypatch):
    """Rank 0's streams used to be restored on every rank, and every device's CUDA state set from rank 0's list:
    a process that sees fewer GPUs at resume than rank 0 saw indexed past them."""
    from ddmim.train.checkpoint_files import every_rank_rng_state, restore_rng_state, rng_state

    ranks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        ranks.append({**rng_state(), "cuda": torch.full((16,), seed, dtype=torch.uint8)})
    earlier = {**rng_state(), "cuda": [torch.full((16,), d, dtype=torch.uint8) for d in range(8)]}  # 8 GPUs
    set_on_device = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_on_device.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [torch.cuda.set_rng_state(s, i)
                                                                          for i, s in enumerate(states)])
    restore_rng_state(ranks, rank=1)
    torch.manual_seed(2)
    assert torch.equal(torch.get_rng_state(), ranks[1]["torch"]) and set_on_device[-1][0] == 2
    restore_rng_state(ranks, rank=5)  # a resume with more ranks than the run had: rank 0's streams
    assert set_on_device[-1][0] == 1
    set_on_device.clear()
    restore_rng_state(earlier, rank=3)  # an earlier version's checkpoint: this device's state of its list
    assert len(set_on_device) == 1 and set_on_device[0][0] == 0
    monkeypatch.undo()
    assert len(every_rank_rng_state()) == 1  # one process: its own state, no collective


UNGUARDED_SCRIPT = """
import sys
from pathlib import Path

from ddmim.config import make_config
from ddmim.data.dali_loader import open_loader
from ddmim.data.loader_spec import LoaderSpec

loader = open_loader(Path(sys.argv[1]) / "train", LoaderSpec.of(make_config("tiny")), train=True, gpu=False)
print("screened", len(loader.shards[0]) if loader.shards else "all", "skipped", loader.skipped.count)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["standard input", "script file"])
def test_a_script_without_a_main_guard_builds_the_dali_loader(converted, tmp_path, how):
    """The DALI loader checks its shards with several workers before DALI reads them. Spawned processes ran
    the caller's script again: an unguarded script failed, and one read from standard input respawned its
    workers for ever (a 900 s hang). The limit here only guards against that hang."""
    from ddmim.data.dali_repair import usable_cores

    assert len(usable_cores()) > 1 and len(list((converted["dali"] / "train").glob("*.tar"))) > 1  # in parallel
    script = tmp_path / "check.py"
    script.write_text(UNGUARDED_SCRIPT)
    command = [sys.executable, "-" if how == "standard input" else str(script), str(converted["dali"])]
    done = subprocess.run(command, input=UNGUARDED_SCRIPT if how == "standard input" else None, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0 and "bootstrapping" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip() == "screened all skipped 0"


@pytest.mark.parametrize("writer", ["ddmim", "lightning"])
def test_a_full_disk_while_a_new_column_rewrites_metrics_csv_keeps_its_rows(writer, tmp_path, monkeypatch):
    """A new column makes Lightning rewrite metrics.csv; a full disk in that rewrite left it empty (the control:
    Lightning's own writer still does), ddmim's writer keeps the rows already there."""
    import errno

    from pytorch_lightning.loggers.csv_logs import ExperimentWriter

    from ddmim.train.history import _ContinuedWriter

    log = _ContinuedWriter(str(tmp_path), resume=False) if writer == "ddmim" else ExperimentWriter(str(tmp_path))
    log.log_metrics({"train/loss": 1.0}, step=0)
    log.save()
    before = (tmp_path / "metrics.csv").read_text()

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    log.log_metrics({"train/loss": 0.5, "val/loss": 0.7}, step=1)
    with pytest.raises(OSError):
        log.save()
    after = (tmp_path / "metrics.csv").read_text()
    assert (after == before) == (writer == "ddmim"), after


def _slurm_job(tmp_path: Path) -> dict:
    """The environment of a one-task SLURM job (4242), with an `scontrol` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "pretrain",
            "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])
def test_a_scheduler_stop_saves_the_step_and_never_exits_0(stop, sample_root, tmp_path):
    """SIGTERM (a scheduler's stop) and SIGUSR1 (SLURM's warning, in a SLURM job) end the step, write its
    checkpoint and exit 128 + the signal: Lightning's own handling exited 0 at the epoch's end, without a
    checkpoint, and under SLURM wrote an hpc checkpoint mid-step that its final validation then loaded."""
    out = tmp_path / "run"
    cmd = _train_cmd(sample_root, out)
    env = _slurm_job(tmp_path) if stop == signal.SIGUSR1 else ENV
    metrics = Growth(out / "logs" / "metrics.csv")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (metrics() and len(train_steps(out)) >= 3):
        time.sleep(0.02)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + stop, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split(":")[0])
    assert last.startswith(f"ddmim: stopped by {stop.name} after step {step}: ") and "--resume auto" in last
    assert 3 <= step < PLANNED and not (out / "summary.json").exists()
    if stop == signal.SIGUSR1:
        assert "SLURM job 4242 requeued" in last and (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
        assert not list(out.rglob("hpc_ckpt*")), list(out.rglob("hpc_ckpt*"))
    saved = torch.load(out / "checkpoints" / f"step{step:08d}.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step
    chosen = resume_checkpoint(out / "checkpoints", announce=False)
    assert torch.load(chosen, map_location="cpu", weights_only=False)["global_step"] == step  # the stop's step
    done = subprocess.run(_train_cmd(sample_root, out, "--resume", "auto"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("resuming from ")[1].split()[0] == str(chosen)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == PLANNED
    final = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not list(out.glob("checkpoints/last-v*"))  # Lightning's versioned name when last.ckpt was not its own
    assert final["global_step"] == PLANNED  # the weights the final validation measured


@pytest.mark.slow
def test_a_stop_before_the_first_step_is_acted_on_at_its_end(sample_root, tmp_path):
    """SIGUSR1 (SLURM's warning) while the run validates its untrained model, before training: it ended the process
    at once (the signal's default), with no checkpoint and no line; now the first step ends, is saved, and the run
    exits 128 + the signal."""
    out = tmp_path / "run"
    cmd = [*_train_cmd(sample_root, out), "--max-steps", "3"]  # the later value wins
    metrics = out / "logs" / "metrics.csv"
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not metrics.exists():  # the step-0 validation row
        time.sleep(0.02)
    assert not train_steps(out)  # not yet training
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR1, (proc.returncode, err[-2000:])
    step = int(err.strip().splitlines()[-1].split("after step ")[1].split(":")[0])
    assert 1 <= step < 3 and not (out / "summary.json").exists()
    saved = torch.load(out / "checkpoints" / f"step{step:08d}.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step


def test_a_copied_run_folder_resumes_into_its_own_last_checkpoint(sample_root, tmp_path):
    """Lightning's restored state names the original folder's last.ckpt: it wrote last-v1.ckpt in the copy and
    left last.ckpt stale there, and the original's files must stay untouched."""
    train = ["train", "--data", str(sample_root), "--preset", "tiny", "--workers", "0", "--no-progress",
             "--set", "train.ckpt_every_steps=2"]
    assert main([*train, "--out", str(tmp_path / "a"), "--max-steps", "2"]) == 0
    assert os.readlink(tmp_path / "a" / "checkpoints" / "last.ckpt") == "step00000002.ckpt"  # relative: moves along
    original = {p.name: p.read_bytes() for p in (tmp_path / "a" / "checkpoints").iterdir()}
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)  # as `cp -a` copies
    assert main([*train, "--out", str(tmp_path / "b"), "--max-steps", "4", "--resume", "auto"]) == 0
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith("last-v")], names
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4
    assert {p.name: p.read_bytes() for p in (tmp_path / "a" / "checkpoints").iterdir()} == original
    # a copy of a finished run, resumed with nothing left to train: its summary names its own checkpoints
    shutil.copytree(tmp_path / "b", tmp_path / "c", symlinks=True)
    assert main([*train, "--out", str(tmp_path / "c"), "--max-steps", "4", "--resume", "auto"]) == 0
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["checkpoint_last"] == str(tmp_path / "c" / "checkpoints" / "last.ckpt")


def test_checkpoints_written_before_the_linked_last_ckpt_restore_the_periodic_checkpoints_state():
    """Lightning keys a callback's state by its class name: the subclass keeps ModelCheckpoint's key, so a
    checkpoint of before restores the periodic checkpoints' bookkeeping (Lightning warned and dropped it)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ddmim.train.checkpoint_files import StepCheckpoints

    settings = {"dirpath": "x", "every_n_train_steps": 5, "save_last": "link"}
    assert StepCheckpoints(**settings).state_key == ModelCheckpoint(**settings).state_key


def test_last_ckpt_is_replaced_in_one_rename_and_copied_where_there_are_no_symlinks(tmp_path, monkeypatch):
    from ddmim.atomic import point_at

    first, second, last = tmp_path / "step1.ckpt", tmp_path / "step2.ckpt", tmp_path / "last.ckpt"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    last.write_bytes(b"a copy an earlier ddmim wrote")
    replaced = []
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(os.readlink(a)) or os.rename(a, b))
    point_at(last, first)
    assert os.readlink(last) == "step1.ckpt" and last.read_bytes() == b"one" and replaced == ["step1.ckpt"]

    def no_symlinks(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.undo()  # os.replace as it is
    monkeypatch.setattr(os, "symlink", no_symlinks)
    point_at(last, second)
    assert not last.is_symlink() and last.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt"]  # no temporary


def test_a_last_ckpt_linking_a_pruned_checkpoint_is_passed_over(pretrain_ckpt, tmp_path):
    """Pruning removes the oldest step checkpoint before last.ckpt moves on to the new one: a kill in between
    leaves last.ckpt linking nothing."""
    shutil.copy(pretrain_ckpt, tmp_path / "step00000002.ckpt")
    (tmp_path / "last.ckpt").symlink_to("step00000001.ckpt")
    assert resume_checkpoint(tmp_path, announce=False) == tmp_path / "step00000002.ckpt"


def test_resume_takes_the_latest_step_whatever_the_file_times(sample_root, tmp_path):
    """A copy or a `touch` gives an older checkpoint the newest file time: resume goes by the recorded step."""

    out = tmp_path / "run"
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out), "--workers", "0",
                 "--no-progress", "--max-steps", "8", "--set", "train.ckpt_every_steps=4"]) == 0
    older = out / "checkpoints" / "step00000004.ckpt"
    os.utime(older, (time.time() + 60, time.time() + 60))
    chosen = resume_checkpoint(out / "checkpoints", announce=False)
    assert torch.load(chosen, map_location="cpu", weights_only=False)["global_step"] == 8, chosen.name


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(sample_root, tmp_path):
    """Lightning ends a run interrupted by Ctrl-C with sys.exit(1) after its own text. The run has steps enough
    never to end before the signal, however late a loaded machine lets this test send it, and starts with SIGINT
    as a terminal gives it: a pytest-xdist worker can hold it ignored or blocked after earlier tests (twice in CI
    the run went on to its last step), and a child inherits both."""
    out = tmp_path / "run"
    metrics = Growth(out / "logs" / "metrics.csv")
    inherited = signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def as_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])

    proc = subprocess.Popen(_train_cmd(sample_root, out, "--max-steps", "100000"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_a_terminal)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (metrics() and len(train_steps(out)) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, (inherited, err[-2000:])
    assert err.strip().splitlines()[-1].startswith("ddmim: interrupted at step ")
