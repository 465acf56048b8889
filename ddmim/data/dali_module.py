"""The Lightning data module of a DALI conversion (DST/train, DST/val): a `DaliLoader` per split, every rank in
one gloo group, and the training loader's resume state in each checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch.distributed as dist

from ddmim.data.bad_samples import SkippedSamples
from ddmim.data.contracts import check_one_batch_per_rank
from ddmim.data.converted import split_path
from ddmim.data.dali_format import check_shuffled, list_shards, sample_count
from ddmim.data.dali_loader import DaliLoader, open_loader
from ddmim.data.layout import read_class_count
from ddmim.data.loader_spec import LoaderSpec


class DALIDataModule(pl.LightningDataModule):
    applies_randaugment = False
    data_format = "dali"
    resumes_split_otherwise = True  # the rest of an epoch dealt anew (`DaliLoader._resume_resplit`)

    def __init__(self, root: Path, spec: LoaderSpec, channels_last: bool = False):
        super().__init__()
        self.root, self.spec, self.channels_last = Path(root), spec, channels_last
        self.paths = {split: split_path(self.root, split, "dali", spec.data.val_path) for split in ("train", "val")}
        sizes = {split: sample_count(list_shards(path)[1]) for split, path in self.paths.items()}
        self.skipped = {split: SkippedSamples(size) for split, size in sizes.items()}
        self.train_size = sizes["train"]
        check_shuffled(self.root / "train")
        check_one_batch_per_rank(self.root / "train", self.train_size, spec.batch_size)
        self.num_classes = read_class_count(self.root)
        self.group = None
        self.train_loader: DaliLoader | None = None
        self.to_restore: dict | None = None  # the training loader's state in the checkpoint resumed from

    def setup(self, stage: str) -> None:
        if self.group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank calls setup: the group is made collectively

    def _loader(self, split: str, train: bool) -> DaliLoader:
        trainer = self.trainer
        gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return open_loader(self.paths[split], self.spec, train=train, gpu=gpu, channels_last=self.channels_last,
                           skipped=self.skipped[split], shard_id=rank, num_shards=world, group=self.group,
                           accumulate=trainer.accumulate_grad_batches if trainer is not None else 1)

    def train_dataloader(self) -> DaliLoader:
        if self.trainer is not None:
            check_one_batch_per_rank(self.root / "train", self.train_size, self.spec.batch_size,
                                     self.trainer.world_size)
        self.train_loader = self._loader("train", train=True)
        if self.to_restore is not None and self.trainer is not None:
            self.train_loader.restore(self.to_restore, self.trainer.global_step)
            self.to_restore = None
        return self.train_loader

    def state_dict(self) -> dict:
        """Saved in every checkpoint by Lightning; the loader's state at the step being saved."""
        if self.train_loader is None or self.trainer is None:
            return {}
        return {"train": self.train_loader.state_at(self.trainer.global_step)}

    def load_state_dict(self, state: dict) -> None:
        self.to_restore = state.get("train")

    def val_dataloader(self) -> DaliLoader:
        return self._loader("val", train=False)
