"""What training reads of a data module, whichever format it reads (folder, FFCV, DALI)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ddmim.data.bad_samples import SkippedSamples


@runtime_checkable
class TrainingData(Protocol):
    """A LightningDataModule with these besides `train_dataloader` and `val_dataloader`."""
    num_classes: int  # classes of the train split (labels 0..num_classes-1)
    applies_randaugment: bool  # False: the loader cannot run timm's PIL RandAugment; the batch gets it instead
    skipped: dict[str, SkippedSamples]  # per split: the samples that failed to decode, replaced in their batches

    def train_dataloader(self): ...

    def val_dataloader(self): ...
