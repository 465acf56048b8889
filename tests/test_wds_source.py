"""WebDataset shards as other tools write them (here Python's tarfile, as webdataset's TarWriter does): listed,
held out and read by the folder loader and both converters as the very images, with the very labels, of the class
folders they were made from."""
import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import QUIET_STEPS
from ddmim.config import make_config
from ddmim.data import detect_format, eval_batches, make_datamodule
from ddmim.data.dali_format import list_shards as list_dali_shards
from ddmim.data.folder import list_splits, open_split
from ddmim.data.listing import UNLABELED, held_out
from ddmim.data.sample_refs import shown
from ddmim.data.transforms import val_transform
from ddmim.errors import UserError


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encoded(path: Path, n: int) -> tuple[str, bytes]:
    """A digit as PNG (its own bytes), JPEG or lossless WebP, so the shards hold every common image key."""
    if n % 3 == 0:
        return "png", path.read_bytes()
    buffer = io.BytesIO()
    image = Image.open(path).convert("RGB")
    image.save(buffer, "JPEG", quality=90) if n % 3 == 1 else image.save(buffer, "WEBP", lossless=True)
    return ("jpg" if n % 6 == 1 else "JPEG") if n % 3 == 1 else "webp", buffer.getvalue()


def _samples(sample_root: Path) -> list[tuple[str, str, str, bytes]]:
    """(split, class, key, ext, bytes) of every fourth digit; every fifth of those is a val image."""
    images = sorted((sample_root / "train").rglob("*.png"))[::4]
    return [("val" if n % 5 == 0 else "train", p.parent.name, f"{p.parent.name}/{p.stem}" if n % 2 else
             f"{p.parent.name}_{p.stem}", *_encoded(p, n)) for n, p in enumerate(images)]


def write_shards(samples, root: Path, per_shard: int = 50, cls: bool = True, splits: bool = True) -> Path:
    """Shards of `samples` with a cls per sample (or none), a metadata member beside each image, a hidden
    member and a sample without an image; under ROOT/<split>/ or, with `splits` False, all in ROOT."""
    for split in ("train", "val"):
        chosen = [s for s in samples if s[0] == split or not splits]
        folder = root / split if splits else root
        folder.mkdir(parents=True, exist_ok=True)
        for number, first in enumerate(range(0, len(chosen), per_shard)):
            with tarfile.open(folder / f"shard-{number:04d}.tar", "w") as tar:
                _add(tar, "._hidden.jpg", b"resource fork")
                for _, label, key, ext, data in chosen[first:first + per_shard]:
                    _add(tar, f"{key}.{ext}", data)
                    if cls:
                        _add(tar, f"{key}.cls", f"{label}\n".encode())
                    _add(tar, f"{key}.json", b'{"source": "test"}')
                _add(tar, "readme.txt", b"no image")
        if not splits:
            break
    return root


def write_folders(samples, root: Path) -> Path:
    for split, label, key, ext, data in samples:
        (root / split / label).mkdir(parents=True, exist_ok=True)
        (root / split / label / f"{key.replace('/', '_')}.{ext}").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def sources(sample_root, tmp_path_factory):
    samples = _samples(sample_root)
    base = tmp_path_factory.mktemp("wds")
    return samples, write_shards(samples, base / "shards"), write_folders(samples, base / "folders")


def _pixels(batches) -> list[tuple[str, int]]:
    """Each image's pixel digest and label, in sorted order: the formats list samples in orders of their own."""
    return sorted((hashlib.sha1(np.ascontiguousarray(x.numpy()).tobytes()).hexdigest(), int(y))
                  for images, labels in batches for x, y in zip(images, labels))


def test_every_sample_of_the_shards_is_listed_once_with_its_label(sources):
    samples, shards, folders = sources
    classes, train, val = list_splits(shards, "auto", 0.01)
    assert classes == [str(c) for c in range(10)]
    listed = {shown(ref).rsplit(":", 1)[1].rsplit(".", 1)[0]: classes[label]
              for ref, label in [*train.files, *val.files]}
    assert listed == {key: label for _, label, key, _, _ in samples}
    assert len(train.files) == sum(s[0] == "train" for s in samples)
    reasons, tars = [reason for _, reason in train.ignored], len(list((shards / "train").glob("*.tar")))
    assert sum(r == "hidden: not read" for r in reasons) == tars
    assert sum("without an image member (txt)" in r for r in reasons) == tars


def test_the_folder_loader_reads_the_images_and_labels_of_the_class_folders(sources):
    _, shards, folders = sources
    for split in ("train", "val"):
        transform = val_transform(32, make_config("tiny").data)
        read = [open_split(root, split, transform) for root in (shards, folders)]
        assert _pixels(DataLoader(read[0], batch_size=64)) == _pixels(DataLoader(read[1], batch_size=64)), split


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_both_converters_write_the_shards_as_they_write_the_class_folders(fmt, sources, tmp_path):
    from data_prep import to_dali, to_ffcv

    _, shards, folders = sources
    converter = to_ffcv if fmt == "ffcv" else to_dali
    for name, src in (("shards", shards), ("folders", folders)):
        assert converter.main([str(src), str(tmp_path / name), "--workers", "1"]) == 0
    assert (tmp_path / "shards" / "classes.json").read_text() == (tmp_path / "folders" / "classes.json").read_text()
    cfg = make_config("tiny", ["data.num_workers=1", "train.batch_size=16"])
    for split in ("train", "val"):
        converted = [_pixels(eval_batches(tmp_path / name, cfg, split)) for name in ("shards", "folders")]
        assert converted[0] == converted[1] and len(converted[0]) > 10, split
    skipped = (tmp_path / "shards" / "skipped.tsv").read_text()
    assert "shard-0000.tar:readme\ta sample without an image member" in skipped and "\0" not in skipped


def test_unlabeled_shards_hold_out_by_key_through_resharding_and_added_shards(sources, tmp_path):
    samples = sources[0]
    _, train, val = list_splits(write_shards(samples, tmp_path / "a", per_shard=40, cls=False, splits=False),
                                "auto", 0.1)
    _, train2, val2 = list_splits(write_shards(samples, tmp_path / "b", per_shard=70, cls=False, splits=False),
                                  "auto", 0.1)

    def keys(listing):
        return {shown(ref).rsplit(":", 1)[1].rsplit(".", 1)[0] for ref, _ in listing.files}

    assert keys(val) == keys(val2) and keys(train) == keys(train2) and 0 < len(val.files) < len(train.files)
    assert all(held_out(k, 0.1) for k in keys(val)) and not any(held_out(k, 0.1) for k in keys(train))
    assert {label for _, label in [*train.files, *val.files]} == {UNLABELED}
    extra = [("train", "0", f"new{n}", "png", s[4]) for n, s in enumerate(samples) if s[3] == "png"]
    with tarfile.open(tmp_path / "a" / "shard-9999.tar", "w") as tar:
        for _, _, key, ext, data in extra:
            _add(tar, f"{key}.{ext}", data)
    _, train3, val3 = list_splits(tmp_path / "a", "auto", 0.1)
    assert keys(val) <= keys(val3) and keys(train) <= keys(train3)
    assert len(train3.files) + len(val3.files) == len(samples) + len(extra)


def test_pretraining_reads_third_party_shards_and_what_needs_labels_says_so(sources, tmp_path):
    from ddmim.train.pretrain import pretrain

    samples, shards, _ = sources
    unlabeled = write_shards(samples, tmp_path / "unlabeled", cls=False)
    assert detect_format(shards) == detect_format(unlabeled) == "folder"  # no DALI indexes: not ddmim's shards
    with pytest.raises(UserError, match="shards of another tool are read with --format folder or dali"):
        list_dali_shards(shards / "train")
    cfg = make_config("tiny", ["data.num_workers=0", "train.batch_size=16"])
    assert make_datamodule(shards, cfg, labels=True).num_classes == 10
    summary = pretrain(cfg, unlabeled, tmp_path / "run", QUIET_STEPS(2))
    assert summary["steps"] == 2 and summary["val_loss_last"] is not None
    with pytest.raises(UserError, match="not every sample of its shards has a label"):
        make_datamodule(unlabeled, cfg, labels=True)


def test_broken_shards_and_forced_layouts_are_named(sources, tmp_path):
    samples, shards, folders = sources
    first = sorted((shards / "train").glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        tenth = tar.getmembers()[10]
    for where, at in (("data", tenth.offset_data + tenth.size // 2), ("header", tenth.offset + 100)):
        (tmp_path / where).mkdir()
        (tmp_path / where / "a.tar").write_bytes(first.read_bytes()[:at])
        _, train, val = list_splits(tmp_path / where, "wds", 0.01)
        assert 1 <= len(train.files) + len(val.files) <= 4, where  # the samples before the cut: 3 members each
        broken = [r for p, r in train.ignored if p.endswith("a.tar")]
        assert len(broken) == 1 and "its remaining samples are not read" in broken[0], (where, train.ignored)
    with tarfile.open(tmp_path / "binary.tar", "w") as tar:
        _add(tar, "k.jpg", samples[1][4])
        _add(tar, "k.cls", b"\x03\x00\x00\x80")  # a label as little-endian int32 (ddmim's DALI shards)
    with pytest.raises(UserError, match="not a label in text.*--format dali"):
        list_splits(tmp_path / "binary.tar", "auto", 0.01)
    with pytest.raises(UserError, match="holds no .tar shards"):
        list_splits(folders, "wds", 0.01)



def test_the_dali_loader_reads_third_party_shards_through_a_view_with_the_folder_loaders_labels(sources, tmp_path,
                                                                                                  monkeypatch):
    from ddmim.data.dali_view import dali_root
    from ddmim.train.pretrain import pretrain

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    samples, shards, _ = sources
    cfg = make_config("tiny", ["data.num_workers=1", "train.batch_size=16", "data.mean=[0,0,0]", "data.std=[1,1,1]"])
    for split in ("train", "val"):
        read = {fmt: [(x, y) for x, y in eval_batches(shards, cfg, split, fmt, labels=True)]
                for fmt in ("dali", "folder")}
        labels = {fmt: torch.cat([y for _, y in batches]) for fmt, batches in read.items()}
        assert labels["dali"].tolist() == labels["folder"].tolist() and len(labels["dali"]) > 10, split
        means = {fmt: torch.cat([x for x, _ in batches]).mean(dim=(2, 3)) for fmt, batches in read.items()}
        torch.testing.assert_close(means["dali"], means["folder"], atol=0.02, rtol=0, msg=split)  # jpg, png, webp
    view = dali_root(shards, cfg.data.val_fraction)
    made = (view / "train" / "conversion.json").stat().st_mtime_ns
    assert dali_root(shards, cfg.data.val_fraction) == view  # made once
    assert (view / "train" / "conversion.json").stat().st_mtime_ns == made
    first = sorted((shards / "train").glob("*.tar"))[0]
    times = first.stat().st_atime_ns, first.stat().st_mtime_ns
    os.utime(first, ns=(times[0], times[1] + 10**9))  # a shard written again: another view
    try:
        assert dali_root(shards, cfg.data.val_fraction) != view
    finally:
        os.utime(first, ns=times)
    unlabeled = write_shards(samples, tmp_path / "unlabeled", cls=False, splits=False)
    summary = pretrain(make_config("tiny", ["data.num_workers=1", "train.batch_size=16", "data.val_fraction=0.2"]),
                       unlabeled, tmp_path / "run", QUIET_STEPS(2), data_format="dali")
    assert summary["steps"] == 2 and summary["val_loss_last"] is not None
    with pytest.raises(UserError, match="has no labels"):
        make_datamodule(unlabeled, cfg, "dali", labels=True)
