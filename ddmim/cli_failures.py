"""What a failed `ddmim` command says: one `ddmim: error: ...` line and an exit code, for a user's mistake or a
full disk (2), an interrupt (130), a scheduler's stop signal (128 + its number, after the step's checkpoint),
memory running out (2) and, under data-parallel training, another rank's stop (2 when that rank left its
reason, else 1); anything else is a bug and keeps its traceback."""
from __future__ import annotations

import signal

from pytorch_lightning.utilities.exceptions import SIGTERMException

from ddmim.errors import UserError, is_full_disk, one_line, say
from ddmim.train.launch import is_launched_worker
from ddmim.train.preemption import STOPPED
from ddmim.train.rank_notes import leave_note, lost_a_rank, notes, this_rank


def out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc)


def said(exc: BaseException) -> int | None:
    """Says `exc` in one line and returns the exit code; None for an error that is not one of these."""
    if isinstance(exc, UserError):
        say(f"ddmim: error: {one_line(exc)}")
        if is_launched_worker():
            leave_note(one_line(exc))
        return 2
    if is_full_disk(exc):
        say(f"ddmim: error: {exc.strerror} writing {exc.filename or 'a file'}: the disk is full or a file-size "
            "limit was reached; the checkpoints already written stay, and --resume auto goes on from them once "
            "there is room")
        return 2
    if isinstance(exc, SystemExit) and STOPPED.get("interrupted"):  # Lightning's exit after Ctrl-C
        say(f"ddmim: interrupted at step {STOPPED['step']}; the checkpoints written before stay, and --resume auto "
            "continues from the last")
        return 130
    if isinstance(exc, SIGTERMException):
        if "signal" not in STOPPED:
            say("ddmim: stopped by SIGTERM before a training step ended: no checkpoint written")
            return 128 + signal.SIGTERM
        requeue = f"; {STOPPED['requeue']}" if "requeue" in STOPPED else ""
        say(f"ddmim: stopped by {signal.Signals(STOPPED['signal']).name} after step {STOPPED['step']}: "
            f"{STOPPED['checkpoint']} written{requeue}; continue with --resume auto")
        return 128 + STOPPED["signal"]
    if isinstance(exc, KeyboardInterrupt):
        say("ddmim: interrupted")
        return 130
    if not isinstance(exc, Exception):
        return None
    if out_of_memory(exc):
        say(f"ddmim: error: out of memory ({one_line(exc)[:200]}); lower --batch-size, or --workers for "
            "the loader's share")
        return 2
    found = notes(wait_s=10.0) if lost_a_rank(exc) else []
    if found:  # a rank this one launched stopped on a bad input: say it once more
        rank, message = found[0]
        say(f"ddmim: error: rank {rank} stopped: {message}")
        return 2
    if is_launched_worker() or lost_a_rank(exc):  # another rank's failure ends this one in a collective
        say(f"ddmim: error on rank {this_rank()}: {type(exc).__name__}: {one_line(exc)[:300]} (the first "
            f"rank to fail says why)")
        return 1
    return None
