"""The run folder: created by rank 0 only, joined by the other ranks, and checked before a resume.

Ranks that a launcher started use rank 0's folder (handed over in the environment by Lightning's launcher,
or the same --out under torchrun and SLURM) and the checkpoint rank 0 chose.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import yaml

from ddmim.atomic import TMP_MARK, owner_tag, write_text
from ddmim.config_engine import build_dataclass
from ddmim.errors import UserError, say
from ddmim.train.checkpoint_files import resume_checkpoint
from ddmim.train.launch import is_launched_worker

RUN_DIR_ENV = "DDMIM_RUN_DIR"
RESUME_ENV = "DDMIM_RESUME_FROM"
LOCK_NAME = ".ddmim.lock"  # kept in the folder: removing it while another process waits on it would race
_HELD: set[int] = set()  # this process's lock descriptors


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker): its copies of the descriptors would keep the lock alive after
    the run that took it released it."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class FolderLock:
    """An exclusive lock on a run folder for as long as one run uses it, so that a second process (a requeued
    job while the first still runs, two `--resume auto`) is refused instead of interleaving its history with
    the first's. The kernel drops the lock when its process ends, however it ends (flock(2); shared file
    systems that support it, NFS included, extend it across hosts). A folder whose file system has no locks
    runs unlocked, with one warning."""

    def __init__(self, folder: Path):
        self.fd: int | None = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 256, 0).decode(errors="replace").strip() or "another process"
            self.release()
            raise UserError(f"run folder {folder} is in use by another ddmim run ({holder}); let it end or stop "
                            f"it, then run this again") from None
        except OSError as exc:
            say(f"ddmim: cannot lock {folder / LOCK_NAME} ({exc.strerror}): nothing keeps a second run out of "
                f"this folder")
            self.release()
            return
        _HELD.add(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, owner_tag().encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # closing the last descriptor unlocks
            self.fd = None


def _holds_files(folder: Path) -> bool:
    return any(p.name != LOCK_NAME for p in folder.iterdir())


def prepare_run_dir(out: Path) -> Path:
    """A fresh run folder; an existing non-empty one is never reused, so no earlier checkpoint is overwritten."""
    if out.is_symlink() and not out.exists():
        raise UserError(f"output {out} is a link to {os.readlink(out)}, which does not exist; create that folder or "
                        f"choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose another --out")
    if out.exists() and _holds_files(out):
        raise UserError(f"output folder {out} already exists and is not empty; choose another --out "
                        "(or --resume auto to continue the run in it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder {out}: {exc.strerror}") from None
    return out


def remove_failed_start(out: Path) -> None:
    """A run that failed before its first step leaves nothing behind that would block the next start."""
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)


# What a resumed run may set differently from the run it continues: how it is run, watched and checkpointed.
# Every other value defines what the run computes, and a checkpoint cannot honour a change to it (the restored
# optimiser and schedule keep the old learning rate, a new seed deals another data order), so it is refused. A
# key a later ddmim adds is refused too until it is listed here. The global batch may be spelt otherwise (another
# process count or per-device batch): the checkpoint's own record of it is checked (`TrainingModule`).
MAY_CHANGE_ON_RESUME = frozenset({
    "name", "train.epochs", "train.val_every", "train.log_every", "train.ckpt_every_steps", "train.keep_checkpoints",
    "train.max_bad_steps", "train.report_every", "train.compile", "train.compile_backend", "train.ddp_bucket_mb",
    "train.kernels", "train.batch_size", "train.global_batch", "train.accumulate", "data.num_workers",
    "data.ffcv_os_cache", "data.max_bad_samples", "eval.every_epochs",
})


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_changes(out: Path, saved: dict, cfg) -> None:
    """One line naming every value this run sets differently from the run in `out`, beyond those a resume may
    change. `saved` is the run's config.yaml, completed with today's defaults (an earlier ddmim's folder)."""
    before = _flat(build_dataclass(type(cfg), cfg.upgrade(saved)).to_dict())
    now = _flat(cfg.to_dict())
    changed = [key for key in now if key not in MAY_CHANGE_ON_RESUME and before.get(key) != now[key]]
    if changed:
        pairs = ", ".join(f"{key} {before.get(key)!r} -> {now[key]!r}" for key in changed)
        raise UserError(f"--resume auto: the run in {out} was started with other values than this command gives "
                        f"({pairs}) and a resumed run keeps its own: drop the changes ({out / 'config.yaml'} has the "
                        "run's values), or start a new run with another --out")


def resume_point(out: Path, cfg) -> Path | None:
    """The checkpoint to continue from (None: the run never wrote one), after checking the run is this one
    (`refuse_changes`)."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        if out.is_dir() and _holds_files(out):
            raise UserError(f"--resume auto: {out} holds files but is not a ddmim run folder (no config.yaml)")
        # a first launch (requeue scripts and torchrun --max-restarts run one command for every launch), or a run
        # killed before it wrote anything
        print(f"no checkpoint found in {out / 'checkpoints'}, starting from step 0")
        return None
    try:
        raw = yaml.safe_load(saved_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raw = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    if not isinstance(raw, dict):
        raise UserError(f"--resume auto: {saved_path} is not a readable run config ({str(raw)[:80]}); restore it "
                        f"from a copy, or start a new run with another --out")
    refuse_changes(out, raw, cfg)
    for stale in (out / "checkpoints").glob(f"*{TMP_MARK}*"):
        stale.unlink()  # left by a writer that was killed; no writer runs while a run is being resumed
    _set_aside_hpc_checkpoints(out)
    return resume_checkpoint(out / "checkpoints", kind=cfg.kind)


def _set_aside_hpc_checkpoints(out: Path) -> None:
    """Lightning's SLURM handler of an earlier ddmim left hpc_ckpt_N.ckpt in the run folder, written mid-step;
    under SLURM Lightning's next fit or validate without a checkpoint path would load it in place of the
    trained weights. Renamed, so that only ddmim's own checkpoints are resumed from."""
    found = sorted(out.glob("hpc_ckpt_*.ckpt"))
    for path in found:
        path.rename(path.with_name(path.name + ".unused"))
    if found:
        print(f"set aside Lightning's mid-step SLURM checkpoints (renamed *.unused): "
              f"{', '.join(p.name for p in found)}")


def open_run_folder(out: Path, cfg, resume: bool) -> tuple[Path, Path | None, FolderLock | None]:
    """(The run folder, the checkpoint to start from, rank 0's lock on the folder, which the caller releases);
    rank 0 also writes the resolved config.yaml."""
    if is_launched_worker():
        run_dir = Path(os.environ.get(RUN_DIR_ENV, out))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            return run_dir, None, None
        chosen = os.environ.get(RESUME_ENV)
        return run_dir, (Path(chosen) if chosen else resume_checkpoint(run_dir / "checkpoints", announce=False)), None
    existing = resume and (out / "config.yaml").is_file()
    if not existing:
        if resume:
            resume_point(out, cfg)  # no config.yaml: refuses a folder of other files, or starts at step 0
        prepare_run_dir(out)
    lock = FolderLock(out)  # before the resume checks, so that what they read cannot change under them
    if not existing and _holds_files(out):  # a run that started in the same moment took the folder first
        lock.release()
        raise UserError(f"output folder {out} was just taken by another run; choose another --out")
    try:
        ckpt = resume_point(out, cfg) if existing else None
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        lock.release()
        raise UserError(f"cannot write {out / 'config.yaml'}: {exc.strerror}; choose an --out you can write to") \
            from None
    except BaseException:
        lock.release()
        raise
    os.environ[RUN_DIR_ENV] = str(out.resolve())
    os.environ[RESUME_ENV] = str(ckpt.resolve()) if ckpt else ""
    return out, ckpt, lock
