"""Reading ddmim checkpoints with a clear error for each way they can be wrong."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddmim.config import Config, config_from_dict
from ddmim.errors import UserError

KIND_KEY = "ddmim_kind"  # "pretrain" or "finetune", written by each LightningModule's on_save_checkpoint
STUDENT_PREFIX = "model.student.net."  # the plain timm model inside the student encoder


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, not a torch file at all
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: "
                        f"{type(exc).__name__}: {exc})") from None


def checkpoint_kind(ckpt: dict[str, Any]) -> str | None:
    return ckpt.get(KIND_KEY) if isinstance(ckpt, dict) else None


def read_pretraining(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The pretraining config and the whole state dict of a checkpoint written by `ddmim train`."""
    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind != "pretrain":
        found = f"a {kind} checkpoint" if kind else "not a ddmim checkpoint"
        raise UserError(f"checkpoint {path} is {found}; a pretraining checkpoint (from ddmim train) is needed")
    return config_from_dict(ckpt["hyper_parameters"]["config"]), ckpt["state_dict"]


def load_pretraining(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The pretraining config and the student encoder's weights (the plain timm model's keys)."""
    cfg, full = read_pretraining(path)
    state = {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise UserError(f"checkpoint {path} holds no student encoder weights")
    return cfg, state
