"""Reading ddmim checkpoints with a clear error for each way they can be wrong."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ddmim.config import Config, config_from_dict, with_overrides
from ddmim.errors import UserError

KIND_KEY = "ddmim_kind"  # "pretrain" or "finetune", written by each LightningModule's on_save_checkpoint
STUDENT_PREFIX = "model.student.net."  # the plain timm model inside the student encoder


DIGEST_KEY = "ddmim_digest"  # of every tensor in the checkpoint, written with it (train/checkpoint_files.py)
FORMAT_KEY = "ddmim_format"  # written with it too; a checkpoint without one is format 1
# 2: the config's `eval` section. Raised whenever a checkpoint gains what an earlier ddmim cannot read, so that
# ddmim says "newer" instead of failing on an unknown key
FORMAT = 2


class NewerCheckpoint(UserError):
    """A checkpoint of a later checkpoint format than this ddmim reads."""


def check_format(ckpt: Any, path: Path) -> None:
    found = ckpt.get(FORMAT_KEY, 1) if isinstance(ckpt, dict) else 1
    if isinstance(found, int) and found > FORMAT:
        raise NewerCheckpoint(f"checkpoint {path} was written by a newer ddmim (checkpoint format {found}; this "
                              f"ddmim reads formats up to {FORMAT}): upgrade ddmim to use it")


def payload_digest(ckpt: Any) -> str:
    """A digest of every tensor's bytes in a checkpoint, walked in its own order (which torch.load keeps)."""
    digest = hashlib.blake2b(digest_size=16)

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            digest.update(str((data.dtype, tuple(value.shape))).encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, dict):
            for key, item in value.items():
                if key != DIGEST_KEY:
                    digest.update(repr(key).encode())
                    visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(ckpt)
    return digest.hexdigest()


def damage(ckpt: Any) -> str | None:
    """Why a checkpoint that loads must not be used: bytes that changed since it was written (its digest), or
    weights that are not finite; None when it is sound. Checkpoints of versions without a digest are trusted."""
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt and payload_digest(ckpt) != ckpt[DIGEST_KEY]:
        return "its contents differ from the digest written with it: the file was damaged after it was written"
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f"its weights hold NaN or infinite values ({bad[0]}{more})"
    return None


def read_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, not a torch file at all
        raise UserError(f"checkpoint {path} cannot be read (truncated or not a checkpoint: "
                        f"{type(exc).__name__}: {exc})") from None
    check_format(ckpt, path)
    problem = damage(ckpt)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str | None:
    return ckpt.get(KIND_KEY) if isinstance(ckpt, dict) else None


# what a checkpoint's weights fix: every model setting but the attention's implementation and the drop-path rate
SHAPE_KEYS = ("method", "backbone", "img_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size",
              "mlp_ratio", "head_dim", "perceptual_tap")


def read_pretraining(path: Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """The pretraining config (with `section.key=value` overrides applied) and the whole state dict of a
    checkpoint written by `ddmim train`."""
    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt)
    if kind != "pretrain":
        found = f"a {kind} checkpoint" if kind else "not a ddmim checkpoint"
        raise UserError(f"checkpoint {path} is {found}; a pretraining checkpoint (from ddmim train) is needed")
    saved = ckpt["hyper_parameters"]["config"]
    cfg = config_from_dict(with_overrides(saved, overrides))
    trained = config_from_dict(saved).model
    for key in SHAPE_KEYS:
        if getattr(cfg.model, key) != getattr(trained, key):
            raise UserError(f"--set model.{key}={getattr(cfg.model, key)}: checkpoint {path} was trained with "
                            f"model.{key}={getattr(trained, key)}, and its weights fix the backbone's shape "
                            f"(fine-tune it to use another)")
    return cfg, ckpt["state_dict"]


def load_pretraining(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """The pretraining config and the student encoder's weights (the plain timm model's keys)."""
    cfg, full = read_pretraining(path)
    state = {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
    if not state:
        raise UserError(f"checkpoint {path} holds no student encoder weights")
    return cfg, state
