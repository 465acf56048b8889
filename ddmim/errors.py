"""The one exception type for mistakes a user can make, and how any error is told in one line (the CLI prints a
UserError so and exits 2)."""
import errno
import sys


class UserError(Exception):
    pass


def say(line: str) -> None:
    """Writes one line to stderr in one write: the ranks of a data-parallel run share the stream, and print's
    separate write of the newline let another rank's line begin in the middle of this one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(exc: BaseException) -> str:
    """An error's own message. A DataLoader worker's error reaches this process with the worker's traceback
    folded into its message: its last line is the message."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(("Error", "Exception")) else last
    return text.splitlines()[0] if text else type(exc).__name__


def is_full_disk(exc: BaseException) -> bool:
    """A write that failed for want of space: a full disk, a quota, a file-size limit."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
