"""A run that a scheduler stops (SIGTERM, what SLURM and Kubernetes send before they kill a job; SIGUSR1, SLURM's
advance warning with `--signal=USR1@90`) finishes its current step, writes a checkpoint of that step and exits
with 128 + the signal's number, as a process the signal ended: never 0, which a scheduler reads as a finished job.
`--resume auto` continues from that checkpoint as from any step checkpoint. Under SLURM, SIGUSR1 also requeues
the job (`scontrol requeue`, as Lightning's own handler would), so the requeued job's `--resume auto` goes on.

Lightning's SLURM handler is switched off (`slurm_environment`): it wrote `hpc_ckpt_N.ckpt` from inside the signal
handler, mid-step, beside ddmim's checkpoints, which resume never chose but Lightning's next `validate` loaded in
place of the trained weights, so the final validation and the best checkpoint were wrong.

Lightning's own SIGTERM handler is never installed: in one process it only acted at the epoch's end (exiting with
code 0 and no checkpoint), and under data parallelism it issued a broadcast from inside the signal handler, at
whatever point each rank was (a forwarded signal reaches the ranks at different moments), so a rank's broadcast met
another rank's gradient all-reduce or checkpoint gather, and the run hung. Here a signal only sets a flag, from the
run's start (before its model is built, its data screened and its first validation) to its end; at each optimiser
step's end the ranks agree on it (one all-reduce of one number, a step's end being where every rank is together)
and all write the checkpoint and stop at that same step. A signal that comes before training is thus acted on at
the first step's end (before, SIGUSR1 in that time ended the process at once, unrequeued), and under gradient
accumulation one that comes mid-step at the step's last micro-batch; a second signal changes nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ddmim.train.accumulation import optimizer_stepped
from ddmim.train.checkpoint_files import save_step_checkpoint

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
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, folder: Path):
        self.folder, self.signal, self.previous = Path(folder), None, {}

    @contextlib.contextmanager
    def listening(self):
        """SIGTERM and SIGUSR1 set the stop flag while inside, in place of what they did before (a SIGUSR1 handler
        the user installed stays)."""
        STOPPED.clear()
        self.signal = None
        for signum in self.SIGNALS:
            if signum == signal.SIGUSR1 and signal.getsignal(signum) not in (signal.SIG_DFL, None):
                continue
            self.previous[signum] = signal.signal(signum, self._asked)
        try:
            yield self
        finally:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.previous = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Lightning installs its SIGTERM handler at each fit's and validate's start, after this hook: it never does
        # (private: `_signal_connector`, checked against pytorch-lightning 2.6.6)
        trainer._signal_connector.register_signal_handlers = lambda: None

    def _asked(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal = signum

    def _agreed(self, trainer) -> bool:
        """Whether any rank was asked to stop (then `signal` is one rank's signal), from the reduced flags alone: a
        signal that lands while the all-reduce runs sets this rank's flag after its part was sent, and deciding on
        that flag as well stopped this rank alone (the others went on, and lost it: "Connection closed by peer")."""
        if trainer.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([self.signal or 0], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed and self.signal is None:
            self.signal = agreed
        return agreed != 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if optimizer_stepped(trainer) and self._agreed(trainer):
            self._save(trainer)
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Lightning then exits with code 1: the CLI says 130
            STOPPED.update(interrupted=True, step=trainer.global_step)

    def _save(self, trainer) -> None:
        path = save_step_checkpoint(trainer, self.folder)
        STOPPED.update(signal=self.signal, step=trainer.global_step, checkpoint=str(path))
        if STOPPED["signal"] == signal.SIGUSR1 and SLURMEnvironment.detect() and trainer.is_global_zero:
            STOPPED["requeue"] = requeue_slurm_job()
