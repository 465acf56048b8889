"""Checkpoints that are complete or absent, and finding the newest one to resume from.

Lightning writes through an fsspec transaction whose temporary file lives in the system temp folder;
when that is another filesystem than the run folder, the final move is a copy, and a kill during it
leaves a truncated checkpoint under the final name. Here the temporary file sits beside the target
and is renamed over it, which is atomic on POSIX filesystems.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ddmim.checkpoints import read_checkpoint
from ddmim.errors import UserError

TMP_MARK = ".tmp-"
STEP_PREFIX = "step"  # recent checkpoints are named step<8 digits>.ckpt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Atomic writes; after each, only the `keep` newest `step*.ckpt` files stay. The pruning is by file name
    rather than by Lightning's top-k bookkeeping, which forgets files a killed run wrote after the checkpoint
    a resumed run starts from."""

    def __init__(self, keep: int = 0):
        super().__init__()
        self.keep = keep

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if self.keep > 0:
            for old in sorted(path.parent.glob(f"{STEP_PREFIX}*.ckpt"))[:-self.keep]:
                old.unlink(missing_ok=True)


def loads(path: Path) -> bool:
    try:
        read_checkpoint(path)
        return True
    except UserError:  # a checkpoint that does not load is not one to resume from
        return False


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently written checkpoint in `folder` that loads (temporary files are never candidates)."""
    candidates = [p for p in Path(folder).glob("*.ckpt") if TMP_MARK not in p.name]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if loads(path):
            return path
    return None


def rng_state() -> dict:
    """Every random generator a run draws from, so a resumed run continues the same streams."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so checkpoints stay loadable with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
