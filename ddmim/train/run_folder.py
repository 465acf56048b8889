"""The run folder: created by rank 0 only, joined by the other ranks, and checked before a resume.

Ranks that a launcher started use rank 0's folder (handed over in the environment by Lightning's launcher,
or the same --out under torchrun and SLURM) and the checkpoint rank 0 chose.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ddmim.atomic import TMP_MARK, write_text
from ddmim.errors import UserError
from ddmim.train.checkpoint_files import resume_checkpoint
from ddmim.train.launch import is_launched_worker

RUN_DIR_ENV = "DDMIM_RUN_DIR"
RESUME_ENV = "DDMIM_RESUME_FROM"


def prepare_run_dir(out: Path) -> Path:
    """A fresh run folder; an existing non-empty one is never reused, so no earlier checkpoint is overwritten."""
    if out.is_symlink() and not out.exists():
        raise UserError(f"output {out} is a link to {os.readlink(out)}, which does not exist; create that folder or "
                        f"choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
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


def resume_point(out: Path, cfg, fixed: tuple[str, ...]) -> Path | None:
    """The checkpoint to continue from (None: the run never wrote one), after checking the run is this one:
    the config sections in `fixed` must be those it was started with."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        if out.is_dir() and any(out.iterdir()):
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
    saved = cfg.upgrade(raw)  # an earlier ddmim's keys, in today's places
    current = cfg.to_dict()
    for section in fixed:
        if saved.get(section) != current[section]:
            raise UserError(f"--resume auto: {out} was made with preset '{saved.get('name')}' and a different "
                            f"'{section}' section than this run (preset '{cfg.name}')")
    for stale in (out / "checkpoints").glob(f"*{TMP_MARK}*"):
        stale.unlink()  # left by a writer that was killed; no writer runs while a run is being resumed
    return resume_checkpoint(out / "checkpoints", kind=cfg.kind)


def open_run_folder(out: Path, cfg, resume: bool, fixed: tuple[str, ...]) -> tuple[Path, Path | None]:
    """(The run folder, the checkpoint to start from); rank 0 also writes the resolved config.yaml."""
    if is_launched_worker():
        run_dir = Path(os.environ.get(RUN_DIR_ENV, out))
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            return run_dir, None
        chosen = os.environ.get(RESUME_ENV)
        return run_dir, (Path(chosen) if chosen else resume_checkpoint(run_dir / "checkpoints", announce=False))
    ckpt = resume_point(out, cfg, fixed) if resume else None
    if not resume or not (out / "config.yaml").is_file():
        prepare_run_dir(out)
    try:
        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    except OSError as exc:
        raise UserError(f"cannot write {out / 'config.yaml'}: {exc.strerror}; choose an --out you can write to") \
            from None
    os.environ[RUN_DIR_ENV] = str(out.resolve())
    os.environ[RESUME_ENV] = str(ckpt.resolve()) if ckpt else ""
    return out, ckpt
