"""DALI data (ROOT/<split>/shard-*.tar + .idx from data_prep/to_dali.py) through fn.readers.webdataset.

On CUDA JPEGs are decoded on the GPU (`mixed`); on the CPU by DALI's CPU decoder. Training decodes only
the random crop window (`fn.decoders.image_random_crop`), then resizes, flips and normalises in one
`fn.crop_mirror_normalize`. Shards are split across data-parallel ranks by `shard_id`/`num_shards`;
`pad_last_batch` keeps every epoch's samples inside the epoch.
"""
from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from ddmim.config import Config
from ddmim.data import read_class_count
from ddmim.errors import UserError

READER = "Reader"


def list_shards(folder: Path) -> tuple[list[str], list[str]]:
    if not folder.is_dir():
        raise UserError(f"DALI shard folder {folder} does not exist (make it with data_prep/to_dali.py)")
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise UserError(f"{folder} holds no .tar shards (make them with data_prep/to_dali.py)")
    indexes = [t.with_suffix(".idx") for t in tars]
    for tar, idx in zip(tars, indexes):
        if not idx.is_file():
            raise UserError(f"shard {tar} has no index {idx.name} (data_prep/to_dali.py writes both)")
        head = idx.read_text(errors="replace").split("\n", 1)[0].split()
        if len(head) != 2 or not head[0].startswith("v1.") or not head[1].isdigit():
            raise UserError(f"{idx} is not a DALI webdataset index (wds2idx format)")
        with open(tar, "rb") as f:
            f.seek(257)
            if f.read(5) != b"ustar":
                raise UserError(f"{tar} is not a tar archive")
    return [str(t) for t in tars], [str(i) for i in indexes]


def build_pipeline(folder: Path, cfg: Config, *, train: bool, gpu: bool, shard_id: int = 0, num_shards: int = 1,
                   batch_size: int | None = None, channels_last: bool = False, threads: int | None = None):
    from nvidia.dali import fn, pipeline_def, types

    tars, indexes = list_shards(folder)
    size = cfg.model.img_size
    mean = [m * 255 for m in cfg.data.mean]
    std = [s * 255 for s in cfg.data.std]
    decode_device = "mixed" if gpu else "cpu"
    layout = "HWC" if channels_last else "CHW"

    @pipeline_def
    def pipeline():
        jpegs, labels = fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg", "cls"], dtypes=[types.UINT8, types.INT32],
            shard_id=shard_id, num_shards=num_shards, random_shuffle=train, initial_fill=1024,
            pad_last_batch=True, name=READER, seed=cfg.train.seed)
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_device, output_type=types.RGB, random_area=list(cfg.data.crop_scale),
                random_aspect_ratio=list(cfg.data.crop_ratio), num_attempts=10)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_CUBIC,
                               antialias=False)
            mirror = fn.random.coin_flip(probability=cfg.data.hflip) if cfg.data.hflip > 0 else 0
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, mean=mean,
                                              std=std, mirror=mirror)
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(size / cfg.data.val_crop_ratio),
                               interp_type=types.INTERP_CUBIC)
            images = fn.crop_mirror_normalize(images, crop=(size, size), dtype=types.FLOAT, output_layout=layout,
                                              mean=mean, std=std)
        if gpu:
            labels = labels.gpu()
        return images, labels

    pipe = pipeline(batch_size=batch_size or cfg.train.batch_size, num_threads=threads or max(1, cfg.data.num_workers),
                    device_id=torch.cuda.current_device() if gpu else None, seed=cfg.train.seed + shard_id,
                    prefetch_queue_depth=2)
    pipe.build()
    return pipe


class DaliLoader:
    """A DALI pipeline as a re-iterable of (images, labels) batches with a length, for Lightning."""

    def __init__(self, pipe, *, train: bool, channels_last: bool = False):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        self.iterator = DALIGenericIterator([pipe], ["images", "labels"], reader_name=READER,
                                            last_batch_policy=policy, auto_reset=True)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self):
        for out in self.iterator:
            images, labels = out[0]["images"], out[0]["labels"].reshape(-1).long()
            if self.channels_last:  # HWC batches viewed as NCHW tensors in channels-last memory
                images = images.permute(0, 3, 1, 2)
            yield images, labels


class DALIDataModule(pl.LightningDataModule):
    applies_randaugment = False
    def __init__(self, root: Path, cfg: Config, channels_last: bool = False):
        super().__init__()
        self.root, self.cfg, self.channels_last = Path(root), cfg, channels_last
        list_shards(self.root / "train")
        list_shards(self.root / "val")
        self.num_classes = read_class_count(self.root)

    def _loader(self, split: str, train: bool) -> DaliLoader:
        trainer = self.trainer
        gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        pipe = build_pipeline(self.root / split, self.cfg, train=train, gpu=gpu, shard_id=rank, num_shards=world,
                              channels_last=self.channels_last)
        return DaliLoader(pipe, train=train, channels_last=self.channels_last)

    def train_dataloader(self) -> DaliLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DaliLoader:
        return self._loader("val", train=False)
