"""Files and folders that appear complete or not at all: the one rule for writing under a temporary name and
renaming into place, used by every writer of the project (checkpoints, run-folder files, exports, converted
data sets, caches).

A temporary is a hidden sibling of its final path, `.NAME.tmp-HOST:PID` (plus `.THREAD` off the main thread), a
name no reader accepts. It is stale when its process is gone: `owner_alive` answers that for this host, and a
temporary written by another host, which cannot be checked, is left to the user.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # an earlier folder set aside while a new one is put in place (where two cannot be swapped)


def owner_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def temp_path(final: Path) -> Path:
    """Where `final` is written before it is renamed into place."""
    final = Path(final)
    thread = "" if threading.current_thread() is threading.main_thread() else f".{threading.get_ident()}"
    return final.with_name(f".{final.name}{TMP_MARK}{owner_tag()}{thread}")


def owner_alive(tag: str) -> bool | None:
    """Whether the process that wrote `tag` (HOST:PID...) still runs: True or False on this host, None when
    another host wrote it. This very process's id counts as gone: a tag with it was left by an earlier process
    that had the same id (a restarted container), since a writer never asks about its own temporaries."""
    host, _, rest = tag.rpartition(":")
    if host and host != socket.gethostname():
        return None
    digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]
    if not digits:
        return None
    if int(digits) == os.getpid():
        return False
    try:
        os.kill(int(digits), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_path(final: Path):
    """Yields the temporary path to write `final` through (for writers that take a path); renames it into place
    when the block ends (unless the block left nothing there: a writer may find it has nothing to write), and
    removes it when the block fails."""
    final = Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(final: Path, mode: str = "w", fsync: bool = False, **open_kwargs):
    """Yields an open file that becomes `final` when the block ends (flushed, and with `fsync` on the disk
    first), and nothing when it fails."""
    with atomic_path(final) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_text(final: Path, text: str) -> None:
    with atomic_write(final) as f:
        f.write(text)


def point_at(link: Path, target: Path) -> None:
    """Makes `link` a symlink to `target` (relative: the folder can be moved or copied whole) in one rename, so
    that `link` is never missing; where the filesystem has no symlinks, a copy of `target`."""
    link = Path(link)
    with atomic_path(link) as tmp:
        try:
            os.symlink(os.path.relpath(target, link.parent), tmp)
        except OSError:
            shutil.copyfile(target, tmp)


@contextmanager
def staged_folder(final: Path):
    """Yields an empty temporary folder that replaces `final` (see `publish`) when the block ends, and is
    removed when it fails."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Moves a finished output into place so that a kill at any moment leaves the old output or the new one
    complete under the final name, never a mix: a file is renamed over the old one; a folder is first renamed to
    a temporary name, then swapped with the old folder in one atomic step (Linux renameat2 RENAME_EXCHANGE), and
    the old one, now under the temporary name, is deleted last. Where the filesystem cannot swap, the old folder
    is renamed aside first (`OLD_MARK`; the converters put it back if a kill comes before the new one is in
    place)."""
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(tmp, final)
        return
    staged = temp_path(final)
    os.replace(tmp, staged)
    if not exchange(staged, final):
        aside = final.with_name(f".{final.name}{OLD_MARK}{owner_tag()}")
        os.replace(final, aside)
        os.replace(staged, final)
        staged = aside
    shutil.rmtree(staged)


def exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically; False where the system or filesystem cannot (then nothing was changed)."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))
