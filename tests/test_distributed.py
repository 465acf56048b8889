"""Data-parallel training on 2 CPU processes (gloo): identical weights, and the same loss as one process."""
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ENV, REPO, Growth, ddmim_cmd, kill_when, newest_step, run, settings, train_steps
from torch.nn.parallel import DistributedDataParallel

from ddmim.cli import main
from ddmim.config import make_config
from ddmim.models.factory import pretraining_model

pytestmark = pytest.mark.slow  # every test starts a data-parallel launcher or spawns ranks

WORLD, GLOBAL_BATCH, STEPS = 2, 8, 3
DETERMINISTIC = ["recon", "perceptual_0", "perceptual_1", "perceptual_2", "perceptual_3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    torch.manual_seed(0)
    model = pretraining_model(make_config("tiny"))
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base, masks = model.draw_masks(GLOBAL_BATCH, seed=5)  # fixed masks: the deterministic parts are comparable
    return model, images, base, masks


def _gather_all(z: torch.Tensor):
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts), dist.get_rank() * z.shape[0]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model, images, base, masks = _setup()
    part = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
    local = (images[part], base[part], [m[part] if m is not None else None for m in masks])
    with torch.no_grad():
        terms = torch.stack([model(*local, gather=_gather_all)[k] for k in DETERMINISTIC])
    dist.all_reduce(terms)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(STEPS):
        ddp(*local, gather=_gather_all)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        model.update_teacher(0.999)
    flat = torch.cat([t.detach().flatten() for t in model.state_dict().values() if t.is_floating_point()])
    everyone = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(everyone, flat)
    if rank == 0:
        torch.save({"terms": terms / WORLD, "weights": everyone}, out)
    dist.destroy_process_group()


def test_two_process_data_parallel_matches_one_process(tmp_path):
    out = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    result = torch.load(out)
    first, second = result["weights"]
    assert torch.equal(first, second)  # student, heads and EMA teacher identical on both ranks
    model, images, base, masks = _setup()
    with torch.no_grad():
        single = model(images, base, masks)
    expected = torch.stack([single[k] for k in DETERMINISTIC])
    torch.testing.assert_close(result["terms"], expected, rtol=1e-5, atol=1e-6)
    start = torch.cat([t.flatten() for t in model.state_dict().values() if t.is_floating_point()])
    assert not torch.equal(first, start)  # the ranks trained


def _two_cpu_processes(command: str, data, out, steps: int, preset: str = "tiny", extra: tuple = ()) -> dict:
    """Runs `ddmim COMMAND` on two gloo processes that Lightning's own launcher starts (it runs the same
    command again for rank 1); returns the run's summary."""
    proc = subprocess.run([sys.executable, "-m", "ddmim", command, "--data", str(data), "--preset", preset,
                           "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--max-steps", str(steps),
                           "--epochs", "1", "--workers", "0", "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in out.glob("summary*.json")] == ["summary.json"]  # written once, by rank 0
    return json.loads((out / "summary.json").read_text())


def test_cli_launches_two_cpu_processes(sample_root, tmp_path, capsys):
    # a step checkpoint at step 4: the end-of-epoch one that --max-steps makes holds the epoch as done
    summary = _two_cpu_processes("train", sample_root, tmp_path / "run", steps=4,
                                 extra=("--set", "train.ckpt_every_steps=2"))
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["val_loss_last"] < summary["val_loss_first"]
    # resumed on one process with the same per-device batch, its global batch would halve: refused in one line
    code = main(["train", "--data", str(sample_root), "--preset", "tiny", "--max-steps", "8", "--epochs", "1",
                 "--workers", "0", "--out", str(tmp_path / "run"), "--no-progress", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and "x 2 process(es) x 1 micro-batch(es)" in err and "x 1 process(es) x 1" in err, err
    # on one process with twice the per-device batch (the same global batch) it goes on
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--max-steps", "8", "--epochs", "1",
                 "--workers", "0", "--out", str(tmp_path / "run"), "--no-progress", "--resume", "auto",
                 "--set", "train.batch_size=128"]) == 0
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (resumed["steps"], resumed["world_size"], resumed["global_batch"], resumed["accumulate"]) == (8, 1, 128, 1)


def test_dali_validation_under_ddp_with_parts_of_unequal_size(digits_dali, tmp_path):
    """355 validation images on 2 ranks: parts of 178 and 177, whose last batches differ by an image. The
    contrastive loss gathers every rank's features, and gloo aborted the run on the unequal sizes until the
    DALI loader padded the smaller batch."""
    summary = _two_cpu_processes("train", digits_dali, tmp_path / "run", steps=2)
    assert summary["world_size"] == 2 and summary["val_loss_first"] is not None


@pytest.mark.parametrize("preset", ["tiny_simmim", "tiny_mae"])
def test_methods_without_a_teacher_train_under_ddp_without_an_unused_parameter_search(preset, sample_root, tmp_path):
    """DDP runs with find_unused_parameters=False: a trained weight without a gradient would stop the second
    step (SimMIM's teacher and projection head are not built; the pooled heads they skip are frozen)."""
    extra = ("--set", "model.head_dim=16")  # tiny_mae has no classifier head otherwise
    summary = _two_cpu_processes("train", sample_root, tmp_path / "run", steps=3, preset=preset, extra=extra)
    assert summary["world_size"] == 2 and summary["steps"] == 3


def test_one_process_accumulating_two_batches_trains_as_two_processes(sample_root, tmp_path):
    """One global batch of 64 as 2 processes x 32 and as 1 process x 2 micro-batches of 32: the same images and
    masks per step, so the same weights up to the order of float32 sums (SimMIM: no negatives gathered across
    the ranks, which micro-batches do not share; no drop path, whose draws follow the process). Measured: 1.7e-6
    at most. The logged loss of a step is its global batch's: the mean of its micro-batches', of its ranks'."""
    common = ("--set", "model.drop_path_rate=0", "--set", "train.batch_size=32", "--set", "train.global_batch=64",
              "--set", "ema.every=2", "--set", "train.ckpt_every_steps=2", "--set", "train.log_every=1")
    two = _two_cpu_processes("train", sample_root, tmp_path / "two", steps=4, preset="tiny_simmim", extra=common)
    assert main(["train", "--data", str(sample_root), "--preset", "tiny_simmim", "--max-steps", "4", "--epochs", "1",
                 "--workers", "0", "--out", str(tmp_path / "one"), "--no-progress", *common]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert (one["accumulate"], two["accumulate"]) == (2, 1) and one["global_batch"] == two["global_batch"] == 64

    def final(run: str, name: str = "last.ckpt") -> dict:
        return torch.load(tmp_path / run / "checkpoints" / name, map_location="cpu", weights_only=False)
    a, b = final("one"), final("two")
    assert a["global_step"] == b["global_step"] == 4
    assert a["ema_updates"] == b["ema_updates"] == 2  # the EMA counts steps (0 and 2), not micro-batches
    lrs = [ckpt["optimizer_states"][0]["param_groups"][0]["lr"] for ckpt in (a, b)]
    assert lrs[0] == lrs[1] > 0
    difference = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    moved = max((a["state_dict"][k] - final("one", "step00000002.ckpt")["state_dict"][k]).abs().max().item()
                for k in a["state_dict"])
    assert difference < 1e-4 < moved / 10, (difference, moved)  # a control: two steps move the weights far more
    losses = [{row["step"]: float(row["train/loss"]) for row in csv.DictReader(open(tmp_path / run / "logs" /
                                                                                   "metrics.csv")) if row["train/loss"]}
              for run in ("one", "two")]
    assert len(losses[0]) == 4 and losses[0].keys() == losses[1].keys()
    assert all(abs(losses[0][step] - losses[1][step]) < 1e-4 for step in losses[0]), losses


def test_cli_fine_tunes_on_two_cpu_processes_with_one_summary(sample_root, tmp_path):
    """The shared run flow: rank 1 joins rank 0's run folder instead of refusing it as not empty."""
    summary = _two_cpu_processes("finetune", sample_root, tmp_path / "ft", steps=3)
    assert summary["world_size"] == 2 and summary["steps"] == 3 and 0 <= summary["val_top1"] <= 100


RECORDING_LAUNCH = """
import json, os, sys
from ddmim.data.resumable import ResumableSampler
from ddmim.cli import main

plain = ResumableSampler.__iter__

def recorded(self):
    # the epoch order this rank's sampler deals out, under the rank its launcher gave the process
    visits = list(plain(self))
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    name = f"{os.environ.get('SEGMENT', '')}rank{rank}-epoch{self.epoch}.json"
    with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as f:
        json.dump({"sampler_rank": self.rank // self.accumulate, "world": self.num_replicas // self.accumulate,
                   "accumulate": self.accumulate, "indices": [i for i, _ in visits]}, f)
    return iter(visits)

ResumableSampler.__iter__ = recorded
sys.exit(main())
"""


def test_two_nodes_under_torchrun_share_one_run_folder(sample_root, tmp_path):
    """Node-rank handling, as on a cluster: two torchrun "nodes" of one process each on this machine (gloo,
    localhost rendezvous) make one run folder, one summary and one set of checkpoints, and their samplers deal
    the epoch out between them: no training image on both ranks."""
    port, out, record = _free_port(), tmp_path / "run", tmp_path / "record"
    record.mkdir()
    launch = tmp_path / "launch.py"
    launch.write_text(RECORDING_LAUNCH)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(launch), "train", "--data", str(sample_root), "--preset", "tiny", "--devices", "1",
                               "--num-nodes", "2", "--strategy", "ddp", "--accelerator", "cpu", "--max-steps", "3",
                               "--epochs", "1", "--workers", "0", "--out", str(out), "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "RECORD_DIR": str(record)}) for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    assert [p.name for p in out.glob("summary*.json")] == ["summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert "last.ckpt" in {p.name for p in (out / "checkpoints").glob("*.ckpt")}
    assert not [p for p in out.iterdir() if p.name not in ("checkpoints", "logs", "tensorboard", "config.yaml",
                                                           "summary.json", "curves.png", ".ddmim.lock")]

    dealt = [json.loads((record / f"rank{rank}-epoch0.json").read_text()) for rank in (0, 1)]
    assert [(d["sampler_rank"], d["world"]) for d in dealt] == [(0, 2), (1, 2)]
    images = sum(1 for p in (sample_root / "train").rglob("*") if p.is_file())
    first, second = (d["indices"] for d in dealt)
    part = (images + 1) // 2  # each rank's part of the epoch; the sampler yields its whole batches of 64
    assert len(first) == len(second) == len(set(first)) == len(set(second)) == part // 64 * 64
    assert not set(first) & set(second) and set(first) | set(second) <= set(range(images))


# the FFCV loader's epoch order on each rank (a resumed epoch's from the step it resumed at), as RECORDING_LAUNCH's
RECORDING_FFCV_LAUNCH = """
import json, os, sys
from ffcv.loader import Loader
from ddmim.cli import main

plain = Loader.next_traversal_order

def recorded(self):
    order = plain(self)
    dealt = getattr(self.traversal_order, "order", self.traversal_order)  # inside a resumed epoch's order
    if hasattr(dealt, "dealing"):  # a training loader
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        name = f"{os.environ.get('SEGMENT', '')}rank{rank}-epoch{self.next_epoch}.json"
        with open(os.path.join(os.environ["RECORD_DIR"], name), "w") as f:
            json.dump({"accumulate": dealt.dealing["accumulate"], "indices": [int(i) for i in order]}, f)
    return order

Loader.next_traversal_order = recorded
sys.exit(main())
"""


@pytest.mark.parametrize("fmt", ["folder", "ffcv"])
def test_a_run_killed_on_two_processes_goes_on_on_one_and_back_on_two(fmt, sample_root, request, tmp_path):
    """A requeued job that gets another process count: a 2-process run killed mid-epoch goes on as 1 process x 2
    micro-batches, is killed again and ends on 2 processes. Every image the epoch trains is trained exactly once
    across the kills, in the steps of the run never stopped, and the weights end as that run's up to the order
    of float32 sums (SimMIM without drop path: see the accumulation test above)."""
    steps, batch, record = 14, 32, tmp_path / "record"
    record.mkdir()
    launch = tmp_path / "launch.py"
    launch.write_text(RECORDING_LAUNCH if fmt == "folder" else RECORDING_FFCV_LAUNCH)
    data = sample_root if fmt == "folder" else request.getfixturevalue("digits_ffcv")

    def cmd(out: Path, devices: int, *extra: str) -> list[str]:
        return [sys.executable, str(launch), "train", "--data", str(data), "--preset", "tiny_simmim",
                "--devices", str(devices), "--strategy", "ddp" if devices > 1 else "auto", "--accelerator", "cpu",
                "--max-steps", str(steps), "--workers", "0", "--out", str(out), "--no-progress",
                *settings(model__drop_path_rate=0, train__batch_size=batch, train__global_batch=2 * batch,
                          train__ckpt_every_steps=1, train__log_every=1), *extra]

    def segment(name: str, out: Path, devices: int, kill_at: Callable[[int], bool] | None, *extra: str) -> None:
        env = {**ENV, "RECORD_DIR": str(record), "SEGMENT": name}
        if kill_at is None:
            assert run(cmd(out, devices, *extra), env=env).returncode == 0
            return
        proc = subprocess.Popen(cmd(out, devices, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            assert kill_when(proc, lambda: kill_at(newest_step(out / "checkpoints")), deadline_s=600), name
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # rank 1, which Lightning's launcher started

    segment("whole-", tmp_path / "whole", 2, None)
    out = tmp_path / "killed"
    # an odd step: Lightning's count of the epoch's batches, kept for 1 batch a step, would end the resumed
    # run's steps one micro-batch early (a step 3, 5 on two batches) unless recounted
    segment("a-", out, 2, lambda step: step >= 3 and step % 2)
    first = newest_step(out / "checkpoints")
    assert first % 2
    segment("b-", out, 1, lambda step: step >= first + 4, "--resume", "auto")
    second = newest_step(out / "checkpoints")
    segment("c-", out, 2, None, "--resume", "auto")

    def trained(name: str, ranks: int, step_count: int) -> list[int]:
        """The images a segment trained in its first `step_count` steps, in step order."""
        dealt = [json.loads((record / f"{name}rank{r}-epoch0.json").read_text()) for r in range(ranks)]
        per_step = [[d["indices"][s * batch * d["accumulate"]:(s + 1) * batch * d["accumulate"]] for d in dealt]
                    for s in range(step_count)]
        return [i for step in per_step for part in step for i in part]

    whole = trained("whole-", 2, steps)
    across = trained("a-", 2, first) + trained("b-", 1, second - first) + trained("c-", 2, steps - second)
    assert len(across) == len(set(across)) == steps * 2 * batch  # each image once, the global batch kept
    assert sorted(across) == sorted(whole)  # (in another order within a step: slots are dealt to ranks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == steps and summary["global_batch"] == 2 * batch and summary["world_size"] == 2
    assert train_steps(out) == list(range(steps))  # each step's row once

    a, b = (torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for run_dir in (tmp_path / "whole", out))
    difference = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert difference < 1e-4, difference


SIGNAL_STEPS = 12


def _signal_run_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ddmim_cmd("train", data, out, "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                     "--max-steps", str(SIGNAL_STEPS), "--workers", "0",
                     *settings(train__batch_size=32, train__ckpt_every_steps=1, train__log_every=1), *extra)


@pytest.fixture(scope="module")
def never_signalled(sample_root, tmp_path_factory) -> dict:
    """The last checkpoint of the 2-process run that no signal stopped, for each signal's test."""
    out = tmp_path_factory.mktemp("never-signalled")
    assert run(_signal_run_cmd(sample_root, out)).returncode == 0
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize(("stop", "whole_group"), [(signal.SIGTERM, True), (signal.SIGUSR1, False)])
def test_a_two_process_run_stopped_by_a_signal_saves_one_step_and_resumes_as_never_stopped(stop, whole_group,
                                                                                          sample_root, tmp_path,
                                                                                          never_signalled):
    """A scheduler's signal to every process of the job (SIGTERM), or to the launching process alone (SIGUSR1),
    stops both ranks at one step's end with its checkpoint, exit 128 + the signal. Lightning's own handler
    broadcast from inside the signal handler, and with a checkpoint every step (a gather each step) the run hung
    in 2 of 2 tries."""
    steps = SIGNAL_STEPS

    def cmd(out: Path, *extra: str) -> list[str]:
        return _signal_run_cmd(sample_root, out, *extra)

    out = tmp_path / "stopped"
    metrics = Growth(out / "logs" / "metrics.csv")
    proc = subprocess.Popen(cmd(out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not (metrics() and len(train_steps(out)) >= 3):
            time.sleep(0.02)
        if whole_group:
            os.killpg(proc.pid, stop)
        else:
            proc.send_signal(stop)
        _, err = proc.communicate(timeout=120)  # a hang ends here
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + stop, err[-2000:]
    last = err.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split(":")[0])
    assert last.startswith(f"ddmim: stopped by {stop.name} after step {step}: ") and 3 <= step < steps, last
    assert newest_step(out / "checkpoints") == step
    assert run(cmd(out, "--resume", "auto")).returncode == 0

    a, b = never_signalled, torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == steps
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_data_parallel_runs_do_not_broadcast_the_constant_buffers(tmp_path):
    from ddmim.models.factory import pretraining_model
    from ddmim.train.launch import Launch
    from ddmim.train.trainer import build_trainer

    cfg = make_config("tiny")
    run = build_trainer(tmp_path, cfg, Launch(accelerator="cpu", precision="32", devices=2, strategy="ddp"))
    assert run.trainer.strategy._ddp_kwargs.get("broadcast_buffers") is False
    model = pretraining_model(cfg)
    before = {name: b.clone() for name, b in model.named_buffers()}
    model(torch.randn(2, 3, cfg.model.img_size, cfg.model.img_size), model.draw_masks(2)[0])
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers())  # nothing to keep in step


def test_compiled_training_under_ddp_is_one_graph_split_at_the_gradient_buckets(sample_root, tmp_path):
    """Two defects of compiled data-parallel training, each caught here: Lightning's all_gather of the
    contrastive negatives goes through torch.distributed.nn, which torch.compile refuses, so the whole forward
    fell back to eager and dynamo compiled 9 inner frames; and dynamo splits a graph at DDP's gradient buckets
    (each bucket's all-reduce then overlaps the rest of the backward) only when it compiles inside DDP's
    forward, which the compile trial did not: 1 compiled part. The tiny model's 4.9 MiB of gradients in 1 MiB
    buckets: one traced graph in at least 4 parts (rank 0 reports)."""
    summary = _two_cpu_processes("train", sample_root, tmp_path / "run", steps=2,
                                 extra=("--set", "train.compile=true", "--set", "train.compile_backend=aot_eager",
                                        "--set", "train.ddp_bucket_mb=1"))
    assert (summary["compile"], summary["graphs"], summary["graph_breaks"]) == ("on", 1, 0), summary
    assert summary["compiled_graphs"] >= 4, summary


def _two_cpu_processes_stopping(data, out, *extra: str, codes: tuple[int, ...] = (2,)) -> str:
    """`ddmim train` on two gloo processes that must stop on a bad input: an exit code in `codes` and, on every
    rank, one `ddmim: error` line and no traceback; returns their error output."""
    proc = subprocess.run([sys.executable, "-m", "ddmim", "train", "--data", str(data), "--preset", "tiny",
                           "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu", "--max-steps", "3",
                           "--epochs", "1", "--workers", "0", "--out", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=600)
    said = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("ddmim: skipping"))
    assert proc.returncode in codes, said[-3000:]
    assert "Traceback" not in proc.stderr, said[-3000:]
    return proc.stderr


def test_a_batch_larger_than_a_ranks_part_of_the_data_stops_every_rank_in_one_line(sample_root, tmp_path):
    """1,442 training images: enough for one batch of 800, not for one per rank on 2 ranks (a sampler divided
    by the rank's zero batches)."""
    err = _two_cpu_processes_stopping(sample_root, tmp_path / "run", "--batch-size", "800")
    lines = [line for line in err.splitlines() if line.startswith("ddmim: error")]
    assert len(lines) == 2 and all("721 per rank over 2 ranks: fewer than one batch of 800" in x for x in lines)
    assert not (tmp_path / "run").exists()


def test_a_rank_that_stops_on_bad_data_stops_the_other_in_one_line(sample_root, tmp_path):
    """Validation meets 64 undecodable files in a row. The rank that meets them first stops; the other then
    loses it in a collective, and rank 0 said so in a gloo traceback. Now every rank says one line: rank 0
    repeats rank 1's reason (exit code 2) or is the one that stopped, and a rank that lost the other says so."""
    data = tmp_path / "data"
    shutil.copytree(sample_root, data, copy_function=os.symlink)
    (data / "train" / "junk").mkdir()  # a class of the train split, whose validation images are all damaged
    shutil.copy(next((sample_root / "train" / "0").iterdir()), data / "train" / "junk")
    (data / "val" / "junk").mkdir()
    for i in range(64):
        (data / "val" / "junk" / f"{i:02d}.jpg").write_bytes(os.urandom(2000))
    err = _two_cpu_processes_stopping(data, tmp_path / "run", "--batch-size", "8",
                                      "--set", "data.max_bad_samples=1000", codes=(1, 2))
    errors = [line for line in err.splitlines() if line.startswith("ddmim: error")]
    # one line per rank: the reason (its own, or rank 1's repeated by rank 0: exit code 2), or that it lost the
    # other rank (exit code 1: once, under a CPU hog, rank 0 found no note from rank 1 within 10 s)
    assert len(errors) >= 2 and any("64 files in a row" in e for e in errors), errors
    assert all("64 files in a row" in e or e.startswith("ddmim: error on rank ") for e in errors), errors
