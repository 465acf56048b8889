"""Reconstruction pictures and the reconstruction loss against a trivial baseline, for a pretraining checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from ddmim.checkpoints import read_pretraining
from ddmim.config import Config
from ddmim.data import eval_batches
from ddmim.errors import UserError
from ddmim.models.factory import pretraining_model
from ddmim.models.masking import pixel_mask

UNUSED_BY_OLD_SIMMIM = ("teacher.", "proj.")
# the column labels: the image, its masked input, the reconstruction, the reconstruction pasted into the
# masked pixels of the image
PANELS = ("original", "masked", "reconstruction", "pasted in")
HEADER_PX = 14  # the strip above the columns that names them


def load_model(ckpt: Path) -> tuple[nn.Module, Config]:
    """The pretrained model (PyTorch references for the losses) and its run config."""
    cfg, state = read_pretraining(ckpt)  # one read of the file for config and weights
    model = pretraining_model(cfg)
    missing, unexpected = model.load_state_dict({k[len("model."):]: v for k, v in state.items()
                                                 if k.startswith("model.")}, strict=False)
    # a SimMIM checkpoint of before the teacher-free SimMIM also holds a teacher and a projection head
    unexpected = [k for k in unexpected if not k.startswith(UNUSED_BY_OLD_SIMMIM)]
    if missing or unexpected:
        raise UserError(f"{ckpt} does not fit its own run config's model: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}")
    return model.eval(), cfg


@torch.no_grad()
def reconstruction_report(model: nn.Module, batches, seed: int = 0) -> dict:
    """Masked reconstruction loss against a trivial baseline, both as the model computes them
    (`reconstruction_losses`): e.g. DDMIM's own term against predicting each image's mean visible colour."""
    loss = baseline = 0.0
    n = 0
    for index, (images, _) in enumerate(batches):
        base, _ = model.draw_masks(len(images), seed=seed, index=index)
        ours, trivial = (value.item() for value in model.reconstruction_losses(images, base))
        loss, baseline, n = loss + ours * len(images), baseline + trivial * len(images), n + len(images)
    return {"recon_loss": loss / n, "baseline_loss": baseline / n, "ratio": loss / baseline}


def labelled(grid: torch.Tensor, cell: int) -> Image.Image:
    """The grid (values in [0, 1]) under a white strip with each column's name (PIL's built-in font)."""
    picture = to_pil_image(grid)
    out = Image.new("RGB", (picture.width, picture.height + HEADER_PX), "white")
    out.paste(picture, (0, HEADER_PX))
    draw = ImageDraw.Draw(out)
    for column, name in enumerate(PANELS):
        draw.text((2 + column * cell + 2, 1), name, fill="black")
    return out


@torch.no_grad()
def write_grid(model: nn.Module, images: torch.Tensor, out: Path, mean, std, seed: int = 0) -> Path:
    """One row per image: original, masked input (masked pixels grey), reconstruction, reconstruction pasted
    into the masked pixels of the original; in real colours."""
    base, _ = model.draw_masks(len(images), seed=seed)
    pred = model.reconstruct(images, base)
    visible = pixel_mask(base, images.shape[-1] // base.shape[-1])
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    original, recon = (images * s + m).clamp(0, 1), (pred * s + m).clamp(0, 1)
    masked = original * visible + 0.5 * (1 - visible)
    pasted = original * visible + recon * (1 - visible)
    rows = torch.stack([original, masked, recon, pasted], dim=1).flatten(0, 1)
    zoom = max(1, 96 // images.shape[-1])  # small images are enlarged (nearest) to stay legible
    rows = torch.nn.functional.interpolate(rows, scale_factor=zoom, mode="nearest")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        labelled(make_grid(rows, nrow=len(PANELS), padding=2, pad_value=1.0), cell=rows.shape[-1] + 2).save(out)
    except (OSError, ValueError) as exc:  # PIL raises ValueError for a name it cannot tell the format of
        raise UserError(f"cannot write the picture {out}: {getattr(exc, 'strerror', None) or exc}") from None
    return out


def visualize(ckpt: Path, data: Path, out: Path, num: int = 8, data_format: str = "auto",
              val_path: str = "") -> dict:
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; give the PNG file to write")
    model, cfg = load_model(ckpt)
    cfg.data.val_path = val_path  # the command's data, never the one the checkpoint validated on
    batches = eval_batches(data, cfg, "val", data_format)
    every = torch.cat([x for x, _ in batches])
    images = every[torch.linspace(0, len(every) - 1, min(num, len(every))).long()]  # spread over the classes
    path = write_grid(model, images, out, cfg.data.mean, cfg.data.std, seed=cfg.train.seed)
    return {"grid": str(path), "images": len(images), "panels": list(PANELS)}
