"""Why a data-parallel run stopped, said by every rank in one line.

A rank that stops on a bad input (a UserError) ends the other ranks in their next collective: gloo reports
"Connection closed by peer", NCCL an aborted communicator. Under Lightning's launcher the other ranks are
child processes of rank 0, so the stopping rank leaves its message in a folder they share (named in the
environment they inherit), and rank 0 says it with the exit code of a bad input instead of a traceback.
The note is left when Lightning reports the exception to the callbacks, before its teardown closes the
process group (which is when rank 0 learns that the rank is gone), and rank 0 gives a note a few seconds to
arrive. Ranks started independently (torchrun, SLURM) share no such folder and say that another rank stopped.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from ddmim.atomic import write_text

NOTES_ENV = "DDMIM_RANK_NOTES"
LOST_RANK = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "NCCL error", "Broken pipe")


def this_rank() -> str:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_rank())
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))


def open_notes() -> Path:
    """The folder ranks leave their notes in: made afresh by the process that launches the others (a name left
    in the environment by an earlier command of the same process points to a folder already removed)."""
    os.environ[NOTES_ENV] = tempfile.mkdtemp(prefix="ddmim-rank-notes-")
    return Path(os.environ[NOTES_ENV])


def close_notes(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if os.environ.get(NOTES_ENV) == str(folder):
        del os.environ[NOTES_ENV]


def leave_note(message: str) -> None:
    """Called by a rank that stops on a bad input, before it exits."""
    folder = os.environ.get(NOTES_ENV)
    if not folder or not Path(folder).is_dir():
        return
    try:
        write_text(Path(folder) / f"rank{this_rank()}", message)  # whole or absent when rank 0 reads it
    except FileNotFoundError:
        # rank 0, stopped by the same input, has already said why and removed the folder (`close_notes`)
        if Path(folder).is_dir():
            raise


def notes(wait_s: float = 0.0) -> list[tuple[str, str]]:
    """(rank, message) of every rank that left a note; waits up to `wait_s` for a first one."""
    folder = os.environ.get(NOTES_ENV)
    if not folder or not Path(folder).is_dir():
        return []
    deadline = time.monotonic() + wait_s
    while True:
        found = sorted((p.name[len("rank"):], p.read_text()) for p in Path(folder).glob("rank*"))
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)



def lost_a_rank(exc: BaseException) -> bool:
    """Whether `exc` is a collective ending because another rank stopped."""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", ())
    return isinstance(exc, backend_error) or any(text in str(exc) for text in LOST_RANK)
