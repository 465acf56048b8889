"""`ddmim export`: the student backbone as a safetensors state dict that timm loads with strict=True."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ddmim.atomic import atomic_path, write_text
from ddmim.checkpoints import load_pretraining
from ddmim.errors import UserError
from ddmim.models.factory import headless_export


def timm_call(name: str, kwargs: dict, weights: Path) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"model = timm.create_model({name!r}, {args})\n"
            f"model.load_state_dict(safetensors.torch.load_file({str(weights)!r}), strict=True)")


def export_backbone(ckpt: Path, out: Path) -> dict:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; export writes a folder")
    weights = out / "backbone.safetensors"
    if weights.exists():
        raise UserError(f"{weights} already exists; choose another --out")
    cfg, state = load_pretraining(ckpt)
    net, name, kwargs = headless_export(cfg.model)
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    net.load_state_dict(backbone, strict=True)  # proves the file will load the same way into timm
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                      metadata={"source": str(ckpt)})
        write_text(out / "timm.json", json.dumps({"model_name": name, "kwargs": kwargs}, indent=2))
    except OSError as exc:
        raise UserError(f"cannot write the export into {out}: {exc.strerror or exc}") from None
    call = timm_call(name, kwargs, weights)
    return {"weights": str(weights), "tensors": len(backbone), "timm": call}
