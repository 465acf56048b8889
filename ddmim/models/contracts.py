"""What a backbone and a pretraining method must provide, as Protocols: the factory's tables hold classes
and builders that satisfy these, and a test checks every registered one with `isinstance`."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PlainNet(Protocol):
    """What export and fine-tuning read of any backbone: the plain timm model and the call that rebuilds it."""
    net: nn.Module  # the plain timm model (its `get_classifier()` is the pooled head)
    timm_name: str
    timm_kwargs: dict


@runtime_checkable
class StageBackbone(PlainNet, Protocol):
    """A backbone of the masked-stage methods (DDMIM, SimMIM)."""
    grid: int  # tokens per side of the base mask
    stride: int  # pixels per last-stage token
    num_features: int  # width of the last stage
    embed_dim: int  # width of the patch tokens (the mask token's size)

    @property
    def stages(self) -> nn.Module:
        """The modules the EMA teacher copies."""

    def forward_features(self, images: torch.Tensor, masks: list[torch.Tensor | None] | None = None,
                         mask_token: torch.Tensor | None = None,
                         stages: nn.Module | None = None) -> list[torch.Tensor]:
        """Every stage's tapped output with the stage masks applied; `stages` runs another copy (the teacher's)
        on this backbone's patch embedding."""

    def forward_head(self, last: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The pooled embedding of the last stage's tokens."""

    def normed(self, last: torch.Tensor) -> torch.Tensor:
        """The final norm of the last stage's tokens."""


@runtime_checkable
class VisibleBackbone(PlainNet, Protocol):
    """A backbone of MAE: it encodes the visible patches only."""
    grid: int
    patch_size: int
    embed_dim: int

    def forward_visible(self, images: torch.Tensor, visible: torch.Tensor,
                        count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded tokens of the `count` visible patches, their indices)."""


@runtime_checkable
class PretrainingMethod(Protocol):
    """What the pretraining LightningModule calls on a method (an nn.Module)."""
    uses_teacher: bool

    def draw_masks(self, batch: int, *, device=None, seed: int = 0,
                   index: int = 0) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(base mask, stage masks) of draw `index` of random stream `seed`."""

    def forward(self, images: torch.Tensor, base_mask: torch.Tensor, masks=None, gather=None) -> dict:
        """Every loss term of one batch; "loss" is the one trained."""

    def reconstruct(self, images: torch.Tensor, base_mask: torch.Tensor) -> torch.Tensor:
        """The predicted image for masked input."""

    def reconstruction_losses(self, images: torch.Tensor,
                              base_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this model's reconstruction loss, a trivial guess's), for the reconstruction report."""

    def update_teacher(self, decay: float, skip=None) -> None:
        """One EMA step of the teacher (nothing, for a method without one)."""

    def to_channels_last(self) -> None:
        """Weights (and outputs, where it pays) in the channels-last layout."""
