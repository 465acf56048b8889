"""What the tests that start processes share: the `ddmim` command lines, running one, and stopping one at an
observable event."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
# faulthandler: a process that `run` stops for running too long prints every thread's stack first
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def ddmim_cmd(command: str, data: Path, out: Path, *extra: str, preset: str = "tiny") -> list[str]:
    """`python -m ddmim COMMAND` on `data` into the run folder `out`, without a progress bar."""
    return [sys.executable, "-m", "ddmim", command, "--data", str(data), "--preset", preset, "--out", str(out),
            "--no-progress", *extra]


def settings(**values) -> list[str]:
    """`--set` options: settings(train__ckpt_every_steps=4) -> ["--set", "train.ckpt_every_steps=4"]."""
    return [arg for key, value in values.items() for arg in ("--set", f"{key.replace('__', '.')}={value}")]


def run(cmd: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """Runs `cmd` from the checkout, unbuffered, its output captured as text. Past `timeout` its whole process
    group (DDP ranks, loader workers) gets SIGABRT, on which faulthandler prints each one's stacks, and the
    failure shows where they hung."""
    kwargs = {"cwd": REPO, "env": ENV, "text": True, **kwargs}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)
            try:
                stdout, stderr = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # a process that outlives SIGABRT still holds the pipes
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
            raise AssertionError(f"{' '.join(map(str, cmd[:4]))} ... ran past {timeout} s; its stacks:\n"
                                 f"{stderr[-200000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def finish(cmd: list[str], timeout: float = 900) -> str:
    """The stdout of a run that must end with exit 0."""
    done = run(cmd, timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], poll_s: float = 0.02,
              deadline_s: float = 300, stop: int = signal.SIGKILL) -> bool:
    """Sends `proc` the signal `stop` as soon as `condition()` holds, asked every `poll_s` (keep the condition
    cheap: it competes with the process it watches), and waits for it to end; False if the process ended first
    or the deadline passed."""
    deadline = time.monotonic() + deadline_s
    while proc.poll() is None and time.monotonic() < deadline:
        if condition():
            proc.send_signal(stop)
            proc.wait(timeout=600)
            return True
        time.sleep(poll_s)
    proc.kill()
    proc.wait()
    return False


def newest_step(ckpts: Path) -> int:
    """Step of the newest complete step checkpoint (0: none yet)."""
    return max((int(p.stem[len("step"):]) for p in ckpts.glob("step*.ckpt")), default=0)


class Growth:
    """Whether a file grew since the last look: a stat, so a condition can skip parsing a file that did not."""

    def __init__(self, path: Path):
        self.path, self.size = path, -1

    def __call__(self) -> bool:
        size = self.path.stat().st_size if self.path.exists() else -1
        grew, self.size = size != self.size, size
        return grew


def train_steps(run: Path) -> list[int]:
    """The steps of a run folder's logged training rows, in file order."""
    path = run / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as rows:
        return [int(r["step"]) for r in csv.DictReader(rows) if r.get("train/loss")]
