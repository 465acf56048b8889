"""DDMIM as a plain nn.Module, shaped like MAE's: `forward_encoder`, `forward_decoder`, `forward_loss`.

A masked student encoder (any stage backbone, `ddmim.models.contracts.StageBackbone`), its EMA teacher (a
copy of the student's stages, never trained by gradients), a projection head and a SimMIM pixel decoder.
With no contrastive or perceptual weight (SimMIM) there is no teacher and no projection head, and the pooled
head of the encoder, which nothing then reads, is frozen, so every trained weight gets a gradient (DDP needs
no search for unused parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ddmim.models.ema import ema_update_, make_teacher
from ddmim.models.heads import PixelDecoder, ProjectionHead
from ddmim.models.kernels import KernelOps, resolve_kernels
from ddmim.models.losses import against_mean_colour, info_nce
from ddmim.models.masking import MaskSpec, stage_masks

# Maps this rank's teacher embeddings to (embeddings of all ranks, offset of this rank's rows).
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _local(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    return z, 0


@dataclass(frozen=True)
class DDMIMLoss:
    """The weights of DDMIM's terms: reconstruction + contrastive_weight * InfoNCE + sum of perceptual terms."""
    perceptual_weights: tuple[float, ...]
    contrastive_weight: float = 1.0
    tau: float = 0.05
    recon_normalize: str = "all"
    recon_beta: float = 1.0
    perceptual_beta: float = 1.0
    infonce_extra_logit: bool = True

    @property
    def uses_teacher(self) -> bool:
        return self.contrastive_weight != 0 or any(f != 0 for f in self.perceptual_weights)


class DDMIM(nn.Module):
    def __init__(self, encoder: nn.Module, *, mask: MaskSpec, loss: DDMIMLoss, proj_hidden: int, proj_out: int,
                 head_dim: int, mask_token: bool = False, teacher_mode: str = "train",
                 kernels: KernelOps | None = None):
        super().__init__()
        self.mask, self.loss, self.teacher_mode = mask, loss, teacher_mode
        self.kernels = kernels or resolve_kernels("torch", cuda=False)
        self.student = encoder
        self.teacher = self.proj = None
        if loss.uses_teacher:
            self.teacher = make_teacher(encoder.stages)
            self.proj = ProjectionHead(head_dim, proj_hidden, proj_out)
        else:
            encoder.net.get_classifier().requires_grad_(False)  # the pooled head feeds only the projection
        self.decoder = PixelDecoder(encoder.num_features, encoder.stride)
        self.mask_token = None
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.train()  # the teacher's mode follows `teacher_mode` from the start

    def to_channels_last(self) -> None:
        """Channels-last weights, and reconstructions in the channels-last layout of the images."""
        self.to(memory_format=torch.channels_last)
        self.decoder.memory_format = torch.channels_last

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None

    def train(self, mode: bool = True) -> "DDMIM":
        super().train(mode)
        if self.teacher is not None and self.teacher_mode == "eval":
            self.teacher.eval()  # a fixed target: no drop-path noise
        return self

    def draw_masks(self, batch: int, *, device=None, seed: int = 0, index: int = 0):
        """(base mask, stage masks) of draw `index` of random stream `seed`."""
        m = self.mask
        return self.kernels.draw_masks(batch, self.student.grid, list(m.ratios), exact_count=m.exact_count, seed=seed,
                                       index=index, device=device, patch=m.patch)

    def embedding(self, last: torch.Tensor) -> torch.Tensor:
        return self.proj(self.student.forward_head(last))

    def forward_encoder(self, images: torch.Tensor, masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The student's tapped stage outputs on masked input (the last one is the final stage's)."""
        return self.student.forward_features(images, masks, self.mask_token)

    def forward_decoder(self, last: torch.Tensor) -> torch.Tensor:
        """The reconstructed image from the final stage's tokens."""
        return self.decoder(self.student.normed(last))

    @torch.no_grad()
    def forward_teacher(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's taps on the unmasked image (the student's patch embedding, without gradient)."""
        return self.student.forward_features(images, stages=self.teacher)

    def forward_loss(self, images: torch.Tensor, base_mask: torch.Tensor, student: list[torch.Tensor],
                     pred: torch.Tensor, teacher: list[torch.Tensor] | None, gather: Gather = _local):
        """Every loss term and their weighted sum."""
        w, k = self.loss, self.kernels
        recon = k.recon_loss(pred, images, base_mask, beta=w.recon_beta, normalize=w.recon_normalize)
        if teacher is None:
            return {"loss": recon, "recon": recon}
        with torch.no_grad():
            z_t = self.embedding(teacher[-1])  # the student's head on the teacher's features: a fixed target
        z_all, offset = gather(z_t)
        contrastive = info_nce(self.embedding(student[-1]), z_all, tau=w.tau, offset=offset,
                               extra_logit=w.infonce_extra_logit)
        perceptual = k.stage_losses(student, teacher, beta=w.perceptual_beta)
        loss = recon + w.contrastive_weight * contrastive
        for factor, term in zip(w.perceptual_weights, perceptual):
            loss = loss + factor * term
        out = {"loss": loss, "recon": recon, "contrastive": contrastive}
        out.update({f"perceptual_{i}": term for i, term in enumerate(perceptual)})
        return out

    def forward(self, images: torch.Tensor, base_mask: torch.Tensor, masks: list[torch.Tensor | None] | None = None,
                gather: Gather = _local) -> dict[str, torch.Tensor]:
        """All loss terms for one batch; `base_mask` is (B, grid, grid) with 1 = visible, `masks` the stage
        masks drawn with it (derived from it when not given)."""
        if masks is None:
            masks = stage_masks(base_mask, self.mask.ratios)
        student = self.forward_encoder(images, masks)
        pred = self.forward_decoder(student[-1])
        teacher = self.forward_teacher(images) if self.uses_teacher else None
        return self.forward_loss(images, base_mask, student, pred, teacher, gather)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's image for masked input (for pictures and the reconstruction report)."""
        return self.forward_decoder(self.forward_encoder(images, stage_masks(base_mask, self.mask.ratios))[-1])

    def reconstruction_losses(self, images: torch.Tensor, base_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this model's reconstruction term on masked input, the same term for the trivial guess of each
        image's mean visible colour), with the PyTorch reference loss."""
        return against_mean_colour(self.reconstruct(images, base_mask), images, base_mask,
                                   beta=self.loss.recon_beta, normalize=self.loss.recon_normalize)

    def update_teacher(self, decay: float, skip=None) -> None:
        if self.teacher is not None:
            ema_update_(self.teacher, self.student.stages, decay, skip)
