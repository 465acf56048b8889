"""DDMIM as a plain nn.Module: student, EMA teacher, heads, and the combined objective of one batch."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ddmim.backbone import MaskedSwin, stage_taps
from ddmim.config import Config
from ddmim.ema import ema_update_, make_teacher
from ddmim.heads import PixelDecoder, ProjectionHead
from ddmim.losses import info_nce
from ddmim.masking import stage_masks
from ddmim.ops import draw_masks, recon_loss, stage_losses

# Maps this rank's teacher embeddings to (embeddings of all ranks, offset of this rank's rows).
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _local(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    return z, 0


class DDMIM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.student = MaskedSwin(cfg.model)
        self.teacher = make_teacher(self.student.stages)
        self.proj = ProjectionHead(cfg.model.embed_out, cfg.model.proj_hidden, cfg.model.proj_out)
        self.decoder = PixelDecoder(self.student.num_features, self.student.stride)
        self.mask_token = None
        if cfg.model.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, cfg.model.embed_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.train()  # the teacher's mode follows ema.teacher_mode from the start

    @property
    def uses_teacher(self) -> bool:
        return self.cfg.loss.alpha != 0 or any(f != 0 for f in self.cfg.loss.stagefactor)

    def train(self, mode: bool = True) -> "DDMIM":
        super().train(mode)
        if self.cfg.ema.teacher_mode == "eval":
            self.teacher.eval()  # a fixed target: no drop-path noise
        return self

    def draw_masks(self, batch: int, *, device=None, seed: int = 0, index: int = 0):
        """(base mask, stage masks) of draw `index` of random stream `seed`."""
        return draw_masks(self.cfg.train.kernels, batch, self.student.grid, self.cfg.mask.ratios,
                          exact_count=self.cfg.mask.exact_count, seed=seed, index=index, device=device,
                          patch=self.cfg.mask.patch)

    def embedding(self, stage_out: torch.Tensor) -> torch.Tensor:
        return self.proj(self.student.pooled_head(self.student.norm(stage_out)))

    def forward_encoder(self, images: torch.Tensor, masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """The student's tapped stage outputs (the last one is the final stage's) on masked input."""
        return self.student.forward_stages(self.student.embed(images), masks, self.mask_token)

    def forward_decoder(self, last: torch.Tensor) -> torch.Tensor:
        """The reconstructed image from the final stage's tokens."""
        return self.decoder(self.student.norm(last))

    def forward(self, images: torch.Tensor, base_mask: torch.Tensor, masks: list[torch.Tensor | None] | None = None,
                gather: Gather = _local) -> dict[str, torch.Tensor]:
        """All loss terms for one batch; `base_mask` is (B, grid, grid) with 1 = visible, `masks` the stage
        masks drawn with it (derived from it when not given)."""
        cfg = self.cfg.loss
        kernels = self.cfg.train.kernels
        if masks is None:
            masks = stage_masks(base_mask, self.cfg.mask.ratios)
        tokens = self.student.embed(images)
        student_out = self.student.forward_stages(tokens, masks, self.mask_token)
        last = student_out[-1]
        pred = self.forward_decoder(last)
        recon = recon_loss(kernels, pred, images, base_mask, beta=cfg.recon_beta, normalize=cfg.recon_normalize)
        if not self.uses_teacher:  # reconstruction only (SimMIM): no teacher pass at all
            return {"loss": recon, "recon": recon}

        with torch.no_grad():
            teacher_out = stage_taps(self.teacher, tokens.detach(), [None] * len(masks), self.student.tap)
            # student's norm/head/proj on the teacher's features: a stop-gradient target
            z_t = self.embedding(teacher_out[-1])
        z_all, offset = gather(z_t)
        contrastive = info_nce(self.embedding(last), z_all, tau=cfg.tau, offset=offset,
                               seed_quirk=cfg.infonce_seed_quirk)
        perceptual = stage_losses(kernels, student_out, teacher_out, beta=cfg.perceptual_beta)

        loss = recon + cfg.alpha * contrastive
        for factor, term in zip(cfg.stagefactor, perceptual):
            loss = loss + factor * term
        out = {"loss": loss, "recon": recon, "contrastive": contrastive}
        out.update({f"perceptual_{i}": term for i, term in enumerate(perceptual)})
        return out

    def update_teacher(self, decay: float | None = None) -> None:
        ema_update_(self.teacher, self.student.stages, self.cfg.ema.decay if decay is None else decay)
