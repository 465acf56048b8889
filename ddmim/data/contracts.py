"""What training reads of a data module, whichever format it reads (folder, FFCV, DALI)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ddmim.data.bad_samples import SkippedSamples
from ddmim.errors import UserError


@runtime_checkable
class TrainingData(Protocol):
    """A LightningDataModule with these besides `train_dataloader` and `val_dataloader`."""
    num_classes: int  # classes of the train split (labels 0..num_classes-1)
    applies_randaugment: bool  # False: the loader cannot run timm's PIL RandAugment; the batch gets it instead
    skipped: dict[str, SkippedSamples]  # per split: the samples that failed to decode, replaced in their batches
    data_format: str  # folder | ffcv | dali
    train_size: int  # training samples listed (those that later fail to decode included)
    # True: a run resumes on another split of its global batch (processes, accumulation, per-device batch),
    # going on with the samples its epoch has not trained
    resumes_split_otherwise: bool

    def train_dataloader(self): ...

    def val_dataloader(self): ...


def check_one_batch_per_rank(where, images: int, batch_size: int, world: int = 1, accumulate: int = 1) -> None:
    """Each of `world` ranks trains on its part of the `images` of `where` and drops its last, short batch (the
    folder and FFCV loaders drop the last step short of the global batch): a part smaller than that would train on
    nothing (and a sampler would divide by its zero batches)."""
    if images // world >= batch_size * accumulate:
        return
    ranks = f", {images // world} per rank over {world} ranks" if world > 1 else ""
    step = f" x {accumulate} accumulated micro-batches" if accumulate > 1 else ""
    raise UserError(f"{where} holds {images} training images{ranks}: fewer than one batch of {batch_size}{step}; "
                    f"set --batch-size to at most {images // world // accumulate}"
                    + (" or train on fewer devices" if world > 1 else ""))
