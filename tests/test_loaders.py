"""The FFCV and DALI loaders against the torchvision one: same samples, labels, layout and statistics."""
from collections import Counter
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import COLOURED_CLASSES, decode_index
from ddmim.config import make_config
from ddmim.data import detect_format, make_datamodule
from ddmim.data.dali_format import list_shards
from ddmim.data.dali_loader import open_loader
from ddmim.data.dali_repair import filtered_shards
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.folder import open_split
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.transforms import val_transform
from ddmim.errors import UserError

CPU = torch.device("cpu")
N_TRAIN = 16 * len(COLOURED_CLASSES)


@pytest.fixture
def cfg():
    return make_config("tiny", ["train.batch_size=5", "data.num_workers=1"])


def ffcv_batches(converted, cfg, split="train", train=False, **kwargs):
    kwargs.setdefault("drop_last", False)
    loader = make_loader(converted["ffcv"] / f"{split}.beton", LoaderSpec.of(cfg), train=train, device=CPU, **kwargs)
    return [(x.clone(), y.clone()) for x, y in loader]  # FFCV reuses its batch buffers


def dali_batches(converted, cfg, split="train", train=False, **kwargs):
    return list(open_loader(converted["dali"] / split, LoaderSpec.of(cfg), train=train, gpu=False, **kwargs))


def folder_batches(source, cfg, split="train"):
    dataset = open_split(source, split, val_transform(cfg.model.img_size, cfg.data))
    return list(torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size))


def traced(batches, cfg) -> list[tuple[int, int]]:
    return [(i, int(y)) for x, ys in batches for i, y in zip(decode_index(x, cfg.data.mean, cfg.data.std), ys)]


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_round_trip_every_image_once_with_its_label(backend, converted, cfg):
    batches = (ffcv_batches if backend == "ffcv" else dali_batches)(converted, cfg)
    got = traced(batches, cfg)
    expected = [(i, i // 16) for i in range(N_TRAIN)]  # train images were numbered class by class
    assert sorted(got) == expected  # nothing lost, nothing duplicated, labels right
    assert Counter(y for _, y in got) == Counter({0: 16, 1: 16, 2: 16})
    assert len(batches[-1][1]) == N_TRAIN % cfg.train.batch_size  # the partial last batch is kept


@pytest.mark.parametrize("backend", ["ffcv", "dali"])
def test_training_loader_drops_the_last_partial_batch_and_shuffles(backend, converted, cfg):
    if backend == "ffcv":
        batches = ffcv_batches(converted, cfg, train=True, drop_last=True)
    else:
        batches = dali_batches(converted, cfg, train=True)
    assert len(batches) == N_TRAIN // cfg.train.batch_size
    assert all(x.shape == (5, 3, 32, 32) for x, _ in batches)
    labels = [int(y) for _, ys in batches for y in ys]
    assert labels != sorted(labels)


def test_three_loaders_agree_on_layout_and_statistics(coloured_source, converted, cfg):
    outputs = {"folder": folder_batches(coloured_source, cfg, "val")[0][0],
               "ffcv": ffcv_batches(converted, cfg, "val")[0][0],
               "dali": dali_batches(converted, cfg, "val")[0][0]}
    for name, x in outputs.items():
        assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and x.device == CPU, name
    reference = outputs["folder"].mean(dim=(0, 2, 3))
    for name in ("ffcv", "dali"):
        assert torch.allclose(outputs[name].mean(dim=(0, 2, 3)), reference, atol=0.05), name
        assert outputs[name].min() >= -2.2 and outputs[name].max() <= 2.7, name


def test_dali_shards_split_disjointly_across_ranks(converted, cfg):
    halves = [{i for i, _ in traced(dali_batches(converted, cfg, shard_id=r, num_shards=2), cfg)} for r in (0, 1)]
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(range(N_TRAIN))


def test_dali_training_batches_name_the_samples_they_hold(converted, cfg):
    """Each training batch's source_info gives the samples' ordinals in the split (what a resume on another
    process count leaves out): one ordinal per source image, the same wherever its crops fall in the epoch."""
    loader = open_loader(converted["dali"] / "train", LoaderSpec.of(cfg), train=True, gpu=False)
    pairs = set()
    for _ in range(2):  # two epochs, in two shuffled orders
        batches = [(x.clone(), y.clone()) for x, y in loader]
        ordinals = [int(o) for batch in loader.log.batches for o in batch]
        sources = [i for i, _ in traced(batches, cfg)]
        assert len(ordinals) == len(sources) == len(set(ordinals)) > N_TRAIN // 2
        assert set(ordinals) <= set(range(N_TRAIN))
        pairs |= set(zip(ordinals, sources))
    assert len({o for o, _ in pairs}) == len({i for _, i in pairs}) == len(pairs)  # each name one image
    # the samples a resume leaves out by these names are the images they named
    named = dict(pairs)
    left_out = np.zeros(loader.samples.size, dtype=bool)
    left_out[ordinals[:2 * cfg.train.batch_size]] = True
    loader.shards = filtered_shards(*list_shards(converted["dali"] / "train"), set(), left_out)
    loader.iterator = loader._iterator()
    rest = {i for i, _ in traced([(x.clone(), y.clone()) for x, y in loader], cfg)}
    gone = {named[o] for o in ordinals[:2 * cfg.train.batch_size]}
    assert rest and not rest & gone and len(rest | gone) > N_TRAIN - cfg.train.batch_size


def test_ffcv_distributed_ranks_split_disjointly(converted, cfg):
    halves = []
    for rank in (0, 1):
        with mock.patch("torch.distributed.is_available", return_value=True), \
                mock.patch("torch.distributed.get_world_size", return_value=2), \
                mock.patch("torch.distributed.get_rank", return_value=rank):
            halves.append({i for i, _ in traced(ffcv_batches(converted, cfg, world=2, rank=rank), cfg)})
    assert not halves[0] & halves[1]
    assert halves[0] | halves[1] == set(range(N_TRAIN))


def test_format_detection(coloured_source, converted):
    assert detect_format(coloured_source) == "folder"
    assert detect_format(converted["ffcv"]) == "ffcv"
    assert detect_format(converted["dali"]) == "dali"


def test_bad_fast_format_paths(tmp_path, cfg, converted):
    (tmp_path / "train.beton").write_bytes(b"not a beton at all" * 100)
    with pytest.raises(UserError, match="is not an FFCV .beton"):
        make_datamodule(tmp_path, cfg, "ffcv")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (only_train / "train.beton").symlink_to(converted["ffcv"] / "train.beton")
    with pytest.raises(UserError, match="val.beton does not exist"):
        make_datamodule(only_train, cfg, "ffcv")
    shards = tmp_path / "dali"
    (shards / "train").mkdir(parents=True)
    (shards / "train" / "shard-000000.tar").write_bytes(b"garbage" * 200)
    (shards / "train" / "shard-000000.idx").write_text("v1.2 1\njpg 512 10 a.jpg\n")
    with pytest.raises(UserError, match="is not a tar archive"):
        make_datamodule(shards, cfg, "dali")
    with pytest.raises(UserError, match="train does not exist"):
        make_datamodule(only_train, cfg, "dali")
    (shards / "train" / "shard-000000.tar").unlink()
    (shards / "train" / "shard-000000.idx").unlink()
    with pytest.raises(UserError, match="holds no .tar shards"):
        make_datamodule(shards, cfg, "dali")


def test_every_format_reads_the_same_odd_images_with_the_same_pixels(tmp_path):
    """A 16-bit grey PNG (scaled, not clipped), a GIF, grey and CMYK JPEGs: in all three formats, same means."""
    import numpy as np
    from PIL import Image

    from data_prep import to_dali, to_ffcv

    src = tmp_path / "src"
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)  # full 16-bit range: mean 0.5
    files = {"a_grey16.png": Image.fromarray(ramp), "b_anim.gif": Image.new("P", (32, 32), 3),
             "c_grey.jpg": Image.new("L", (32, 32), 60), "d_cmyk.jpg": Image.new("CMYK", (32, 32), (0, 100, 200, 0))}
    for split in ("train", "val"):
        (src / split / "odd").mkdir(parents=True)
        for name, image in files.items():
            image.save(src / split / "odd" / name)
    assert to_ffcv.main([str(src), str(tmp_path / "ffcv"), "--workers", "1", "--write-mode", "raw"]) == 0
    assert to_dali.main([str(src), str(tmp_path / "dali"), "--workers", "1"]) == 0
    cfg = make_config("tiny", ["train.batch_size=4", "data.num_workers=0", "data.mean=[0,0,0]",
                               "data.std=[1,1,1]"])
    means = {
        "folder": folder_batches(src, cfg, "val"),
        "ffcv": ffcv_batches({"ffcv": tmp_path / "ffcv"}, cfg, split="val", batch_size=4),
        "dali": dali_batches({"dali": tmp_path / "dali"}, cfg, split="val"),
    }
    means = {fmt: torch.cat([x for x, _ in batches]).mean(dim=(2, 3)) for fmt, batches in means.items()}
    assert all(m.shape == (4, 3) for m in means.values())  # the GIF in every format, none left out
    assert abs(float(means["folder"][0].mean()) - 0.5) < 0.02  # the 16-bit ramp scaled: mid-grey on average
    for fmt in ("ffcv", "dali"):
        torch.testing.assert_close(means[fmt], means["folder"], atol=0.02, rtol=0, msg=fmt)


def test_a_visit_gives_the_same_pixels_in_a_worker_and_in_the_main_process(coloured_source):
    """Workers seed their streams per visit without saving them; the main process puts its streams back."""
    import random

    import numpy as np

    from ddmim.data.folder import train_loader
    from ddmim.data.transforms import train_transform

    cfg = make_config("tiny", ["train.batch_size=8", "data.crop_scale=[0.1,0.5]"])
    dataset = open_split(coloured_source, "train", train_transform(cfg.model.img_size, cfg.data))
    batches = {}
    for workers in (0, 2):
        cfg.data.num_workers = workers
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        batches[workers] = [images for images, _ in train_loader(dataset, LoaderSpec.of(cfg))]
        if workers == 0:
            after = torch.rand(1), np.random.rand(), random.random()
    assert len(batches[0]) == len(batches[2]) > 1
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    assert after == (torch.rand(1), np.random.rand(), random.random())  # the visits left the caller's streams alone
