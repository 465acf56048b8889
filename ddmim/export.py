"""`ddmim export`: the student backbone as a safetensors state dict that timm loads with strict=True."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ddmim.backbone import build_swin
from ddmim.backbones import headless
from ddmim.checkpoints import load_pretraining
from ddmim.config import ModelConfig
from ddmim.errors import UserError

TIMM_NAME = "swinv2_tiny_window8_256"  # a registered Swin V2; the keyword arguments below set every shape


def timm_kwargs(model: ModelConfig) -> dict:
    return {"pretrained": False, "num_classes": 0, "img_size": model.img_size, "patch_size": model.patch_size,
            "embed_dim": model.embed_dim, "depths": tuple(model.depths), "num_heads": tuple(model.num_heads),
            "window_size": model.window_size, "mlp_ratio": model.mlp_ratio}


def timm_call(model: ModelConfig, weights: Path) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(model).items())
    return (f"model = timm.create_model({TIMM_NAME!r}, {args})\n"
            f"model.load_state_dict(safetensors.torch.load_file({str(weights)!r}), strict=True)")


def export_backbone(ckpt: Path, out: Path) -> dict:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; export writes a folder")
    weights = out / "backbone.safetensors"
    if weights.exists():
        raise UserError(f"{weights} already exists; choose another --out")
    cfg, state = load_pretraining(ckpt)
    net = build_swin(headless(cfg.model))
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    net.load_state_dict(backbone, strict=True)  # proves the file will load the same way into timm
    tmp = out / ".backbone.safetensors.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), metadata={"source": str(ckpt)})
        tmp.replace(weights)
        (out / "timm.json").write_text(json.dumps({"model_name": TIMM_NAME, "kwargs": timm_kwargs(cfg.model)},
                                                  indent=2))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the export into {out}: {exc.strerror or exc}") from None
    call = timm_call(cfg.model, weights)
    return {"weights": str(weights), "tensors": len(backbone), "timm": call}
