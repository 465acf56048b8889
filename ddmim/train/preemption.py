"""A run that a scheduler stops (SIGTERM, what SLURM and Kubernetes send before they kill a job; SIGUSR1, SLURM's
advance warning with `--signal=USR1@90`) finishes its current step, writes a checkpoint of that step and exits
with 128 + the signal's number, as a process the signal ended: never 0, which a scheduler reads as a finished job.
`--resume auto` continues from that checkpoint as from any step checkpoint. Under SLURM, SIGUSR1 also requeues
the job (`scontrol requeue`, as Lightning's own handler would), so the requeued job's `--resume auto` goes on.

Lightning's SLURM handler is switched off (`slurm_environment`): it wrote `hpc_ckpt_N.ckpt` from inside the signal
handler, mid-step, beside ddmim's checkpoints, which resume never chose but Lightning's next `validate` loaded in
place of the trained weights, so the final validation and the best checkpoint were wrong.

Lightning's own SIGTERM handling sets `trainer.received_sigterm` and, in one process, only acts at the epoch's end
(exiting with code 0 and no checkpoint); here the step's end does. Under data parallelism Lightning agrees on the
stop itself: rank 0's flag is broadcast before every step and every rank raises SIGTERMException at the same
step, where this callback writes the checkpoint (a collective) on every rank.

Under gradient accumulation a signal that comes mid-step is held (Lightning's flag cleared, then set again) until
the step's last micro-batch, so the checkpoint is of a whole step; in the moment between this callback and
Lightning's own check a signal can still stop a step midway: then no checkpoint is written (the CLI says so) and the
resume goes on from the last one.
"""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ddmim.train.accumulation import optimizer_stepped
from ddmim.train.checkpoint_files import STEP_PREFIX

STOPPED: dict = {}  # the last stop by a signal: the signal, step, checkpoint, or an interrupt (read by the CLI)


def slurm_environment() -> list[SLURMEnvironment]:
    """The trainer's cluster environment under SLURM, without Lightning's SIGUSR1 handler; none elsewhere."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def requeue_slurm_job() -> str:
    """Requeues this SLURM job; what happened, in words."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ.get("SLURM_JOB_ID", "")
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"SLURM job {job} not requeued ({type(exc).__name__}: {exc}); requeue it to go on"
    if done.returncode:
        return f"SLURM job {job} not requeued (scontrol: {done.stderr.strip()[:200]}); requeue it to go on"
    return f"SLURM job {job} requeued"


class Preemption(pl.Callback):
    def __init__(self, folder: Path):
        self.folder, self.signal, self.previous = Path(folder), None, None
        self.held = False  # a signal that came mid-step under accumulation, acted on at the step's end

    def on_train_start(self, trainer, pl_module) -> None:
        STOPPED.clear()
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):  # a handler the user installed stays
            self.previous = signal.signal(signal.SIGUSR1, lambda signum, frame: self._asked(trainer, signum))

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGUSR1, self.previous)
            self.previous = None

    def _asked(self, trainer, signum: int) -> None:
        self.signal = signum
        trainer._signal_connector.received_sigterm = True  # Lightning's flag: broadcast from rank 0 under DDP

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stepped = optimizer_stepped(trainer)
        if trainer.received_sigterm and not stepped:
            self.held, trainer._signal_connector.received_sigterm = True, False
        elif self.held and stepped:
            self.held, trainer._signal_connector.received_sigterm = False, True
        if trainer.received_sigterm and trainer.world_size == 1:
            self._save(trainer)
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException) and not STOPPED and optimizer_stepped(trainer):
            self._save(trainer)
        elif isinstance(exception, KeyboardInterrupt):  # Lightning then exits with code 1: the CLI says 130
            STOPPED.update(interrupted=True, step=trainer.global_step)

    def _save(self, trainer) -> None:
        step = trainer.global_step
        path = self.folder / f"{STEP_PREFIX}{step:08d}.ckpt"
        trainer.save_checkpoint(path)
        trainer.save_checkpoint(self.folder / "last.ckpt")
        STOPPED.update(signal=self.signal or signal.SIGTERM, step=step, checkpoint=str(path))
        if STOPPED["signal"] == signal.SIGUSR1 and SLURMEnvironment.detect() and trainer.is_global_zero:
            STOPPED["requeue"] = requeue_slurm_job()
