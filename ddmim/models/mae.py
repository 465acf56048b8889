"""MAE (He et al., 2022) on timm's VisionTransformer: `forward_encoder`, `forward_decoder`, `forward_loss`.

The encoder sees the visible patches only; a light decoder of timm blocks gets the encoded patches back in
place among mask tokens and predicts every patch's pixels; the loss is the mean squared error on the
masked patches, against per-patch normalised pixels by default (`mae.norm_pix`, MAE's recommendation).
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ddmim.models.kernels import KernelOps, resolve_kernels
from ddmim.models.losses import against_mean_colour
from ddmim.models.masking import MaskSpec
from ddmim.models.vit import sincos_with_class_slot


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch * patch * 3), patches in row-major order, pixels (row, column, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int) -> torch.Tensor:
    b, n, _ = patches.shape
    side = int(n ** 0.5)
    x = patches.reshape(b, side, side, patch, patch, 3)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, 3, side * patch, side * patch)


def normalise_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Mean over the masked patches of the per-patch mean squared error; `visible` (B, N), 1 = visible."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    hidden = 1.0 - visible.float()
    return (per_patch * hidden).sum() / hidden.sum().clamp_min(1.0)


class MAE(nn.Module):
    def __init__(self, encoder: nn.Module, *, mask: MaskSpec, decoder_dim: int, decoder_depth: int,
                 decoder_heads: int, norm_pix: bool = True, kernels: KernelOps | None = None):
        """`mask.exact_count` must be set: the encoder's sequence length is the same visible count per image."""
        super().__init__()
        if not mask.exact_count:
            raise ValueError("MAE masks an exact count of patches per image: mask.exact_count must be true")
        self.mask, self.norm_pix = mask, norm_pix
        self.kernels = kernels or resolve_kernels("torch", cuda=False)
        self.student = encoder
        grid, patch = encoder.grid, encoder.patch_size
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos", sincos_with_class_slot(grid, decoder_dim), persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)
        encoder.net.get_classifier().requires_grad_(False)  # pretraining never reads the classifier head
        units = (grid // mask.patch) ** 2  # the masks are drawn with an exact count of masked units per image
        self.visible_count = grid * grid - round(mask.ratios[0] * units) * mask.patch ** 2

    uses_teacher = False

    def to_channels_last(self) -> None:
        """Channels-last weights (the patch embedding); the reconstruction is unpatchified, contiguous."""
        self.to(memory_format=torch.channels_last)

    def update_teacher(self, decay: float, skip=None) -> None:
        """MAE has no teacher."""

    def draw_masks(self, batch: int, *, device=None, seed: int = 0, index: int = 0):
        m = self.mask
        return self.kernels.draw_masks(batch, self.student.grid, list(m.ratios), exact_count=True, seed=seed,
                                       index=index, device=device, patch=m.patch)

    def forward_encoder(self, images: torch.Tensor, base_mask: torch.Tensor):
        return self.student.forward_visible(images, base_mask, self.visible_count)

    def forward_decoder(self, latent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch (B, N, patch * patch * 3)."""
        x = self.decoder_embed(latent)
        b, n = len(x), self.decoder_pos.shape[1] - 1
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        full.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos.to(x.dtype)
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.student.patch_size)
        return normalise_patches(target) if self.norm_pix else target

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, base_mask: torch.Tensor) -> dict:
        loss = masked_patch_loss(pred, self.targets(images), base_mask.flatten(1))
        return {"loss": loss, "recon": loss}

    def forward(self, images: torch.Tensor, base_mask: torch.Tensor, masks=None, gather=None) -> dict:
        latent, ids = self.forward_encoder(images, base_mask)
        return self.forward_loss(images, self.forward_decoder(latent, ids), base_mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor:
        """The predicted image; with norm_pix, each patch is put back at its true mean and spread (as MAE's
        own pictures do)."""
        pred = self.forward_decoder(*self.forward_encoder(images, base_mask))
        if self.norm_pix:
            target = patchify(images, self.student.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return unpatchify(pred, self.student.patch_size)

    def reconstruction_losses(self, images: torch.Tensor, base_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this model's loss, a trivial guess's): on normalised patches the guess is each masked patch's mean
        (zero); on raw pixels it is each image's mean visible colour, both under SimMIM's masked smooth-L1."""
        if self.norm_pix:
            pred = self.forward_decoder(*self.forward_encoder(images, base_mask))
            target, visible = self.targets(images), base_mask.flatten(1)
            return masked_patch_loss(pred, target, visible), masked_patch_loss(torch.zeros_like(pred), target, visible)
        return against_mean_colour(self.reconstruct(images, base_mask), images, base_mask, beta=1.0, normalize="masked")
