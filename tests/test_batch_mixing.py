"""ImageNet's layout in small: class-sorted data, 400 images per class. Every loader's training batches mix
the classes, and the data-parallel ranks together read the whole split once per epoch."""
import struct
import tarfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

from ddmim.config import make_config
from ddmim.data.dali_loader import open_loader
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.folder import open_split, train_loader
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.transforms import train_transform

CLASSES, PER_CLASS = 10, 400


def colour(index: int) -> tuple[int, int, int]:
    """A flat colour per image that survives JPEG and normalisation: the image's index in 16-level digits."""
    return 8 + 16 * (index % 16), 8 + 16 * ((index // 16) % 16), 8 + 16 * (index // 256)


def source_index(images: torch.Tensor, cfg) -> list[int]:
    means = images.float().mean(dim=(2, 3)) * torch.tensor(cfg.data.std) + torch.tensor(cfg.data.mean)
    digits = ((means * 255 - 8) / 16).round().long()
    return (digits[:, 0] + 16 * digits[:, 1] + 256 * digits[:, 2]).tolist()


@pytest.fixture(scope="module")
def sorted_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("class-sorted")
    for split, per_class in (("train", PER_CLASS), ("val", 2)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (16, 16), colour(label * per_class + k)).save(folder / f"{k:04d}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def sorted_converted(sorted_source, tmp_path_factory) -> dict[str, Path]:
    from data_prep import to_dali, to_ffcv

    out = tmp_path_factory.mktemp("class-sorted-converted")
    assert to_dali.main([str(sorted_source), str(out / "dali"), "--workers", "2", "--shard-size", "500"]) == 0
    assert to_ffcv.main([str(sorted_source), str(out / "ffcv"), "--workers", "2"]) == 0
    return {"folder": sorted_source, "ffcv": out / "ffcv", "dali": out / "dali"}


def cfg_for(batch: int):
    return make_config("tiny", [f"train.batch_size={batch}", "data.num_workers=1"])


def train_batches(fmt: str, root: Path, cfg, rank: int = 0, world: int = 1, epochs: int = 1):
    """The training batches of `epochs` epochs that rank `rank` of `world` reads."""
    if fmt == "folder":
        loader = train_loader(open_split(root, "train", train_transform(cfg.model.img_size, cfg.data)),
                              LoaderSpec.of(cfg), rank=rank, world=world)
        out = []
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)  # as Lightning does
            out.append(list(loader))
        return out
    if fmt == "ffcv":
        with mock.patch("torch.distributed.is_available", return_value=True), \
                mock.patch("torch.distributed.get_world_size", return_value=world), \
                mock.patch("torch.distributed.get_rank", return_value=rank):
            loader = make_loader(root / "train.beton", LoaderSpec.of(cfg), train=True, device=torch.device("cpu"),
                                 world=world, rank=rank)
            return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(epochs)]
    loader = open_loader(root / "train", LoaderSpec.of(cfg), train=True, gpu=False, shard_id=rank, num_shards=world)
    return [list(loader) for _ in range(epochs)]


@pytest.mark.parametrize("fmt", ["folder", "ffcv", "dali"])
def test_training_batches_hold_nearly_every_class(fmt, sorted_converted):
    (batches,) = train_batches(fmt, sorted_converted[fmt], cfg_for(64))
    classes_per_batch = [len(set(labels.tolist())) for _, labels in batches]
    assert len(batches) == CLASSES * PER_CLASS // 64
    assert sum(classes_per_batch) / len(classes_per_batch) >= 9, classes_per_batch


@pytest.mark.parametrize("fmt", ["folder", "ffcv", "dali"])
def test_two_ranks_read_the_whole_split_once_per_epoch(fmt, sorted_converted):
    cfg = cfg_for(50)  # 4,000 images: 2 ranks x 40 full batches
    seen = [train_batches(fmt, sorted_converted[fmt], cfg, rank=r, world=2, epochs=2) for r in (0, 1)]
    for epoch in range(2):
        parts = [[i for x, _ in seen[r][epoch] for i in source_index(x, cfg)] for r in (0, 1)]
        assert sorted(parts[0] + parts[1]) == list(range(CLASSES * PER_CLASS)), (fmt, epoch)
    if fmt == "dali":  # every rank moves on to another part of the data in the next epoch
        part = [[{i for x, _ in seen[r][e] for i in source_index(x, cfg)} for e in (0, 1)] for r in (0, 1)]
        assert part[0][1] == part[1][0] and part[0][1] != part[0][0]


def test_dali_shards_are_written_in_shuffled_order(sorted_converted):
    for shard in sorted((sorted_converted["dali"] / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            labels = [struct.unpack("<i", tar.extractfile(m).read())[0] for m in tar if m.name.endswith(".cls")]
        assert len(labels) == 500 and len(set(labels)) == CLASSES, shard
