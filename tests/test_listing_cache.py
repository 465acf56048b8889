"""A folder source's listing, kept between starts: a second start reads no directory and gets the same listing;
any change to the tree makes it list again."""
import os
import shutil
import time
from pathlib import Path

import pytest
from test_sources import _unlabeled_digits

from ddmim.data import listing_cache
from ddmim.data.layout import source_splits


def _settle(root: Path) -> None:
    """Every folder's time an hour back, as a tree that is not being written has it."""
    past = time.time() - 3600
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def _flat(result):
    classes, *listings = result
    return classes, [(list(listing.files), listing.ignored) for listing in listings]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # a rank's variable left by another test would stop the writing
    monkeypatch.setattr(listing_cache, "CACHED_FROM", 1)  # the digits are far fewer than a source worth a file
    return tmp_path / "cache" / "ddmim" / "listings"


@pytest.fixture
def unlabeled_copy(sample_root, tmp_path) -> Path:
    root = _unlabeled_digits(sample_root, tmp_path / "photos")
    _settle(root)
    return root


class DirectoryRead(AssertionError):
    pass


def _no_directory_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise DirectoryRead(args)

    monkeypatch.setattr(os, "scandir", refuse)
    monkeypatch.setattr(os, "listdir", refuse)


@pytest.mark.parametrize("kind", ["unlabeled", "imagefolder"])
def test_a_second_listing_reads_no_directory_and_equals_the_first(kind, cache, unlabeled_copy, sample_root,
                                                                   tmp_path, monkeypatch):
    if kind == "imagefolder":
        root = tmp_path / "digits"
        shutil.copytree(sample_root, root)
        _settle(root)
    else:
        root = unlabeled_copy
    first = source_splits(root, "auto", 0.1)
    assert len(list(cache.glob("*.npz"))) == 1
    with monkeypatch.context() as patched:
        _no_directory_reads(patched)
        second = source_splits(root, "auto", 0.1, labels=kind == "imagefolder")
    assert _flat(second) == _flat(first)
    assert len(first[1].files) > 0 and len(first[2].files) > 0
    # control: without its kept listing the same call reads directories
    for kept in cache.glob("*.npz"):
        kept.unlink()
    with monkeypatch.context() as patched, pytest.raises(DirectoryRead):
        _no_directory_reads(patched)
        source_splits(root, "auto", 0.1)


def test_a_file_added_or_removed_deep_in_the_tree_lists_again(cache, unlabeled_copy):
    first = source_splits(unlabeled_copy, "auto", 0.1)
    added = unlabeled_copy / "2024-03" / "day1" / "added.png"
    shutil.copy(next(unlabeled_copy.rglob("*.png")), added)
    grown = source_splits(unlabeled_copy, "auto", 0.1)
    paths = {p for listing in grown[1:] for p, _ in listing.files}
    assert str(added) in paths and len(paths) == sum(len(listing.files) for listing in first[1:]) + 1
    added.unlink()
    _settle(unlabeled_copy)
    assert str(added) not in {p for listing in source_splits(unlabeled_copy, "auto", 0.1)[1:]
                              for p, _ in listing.files}


def test_a_listing_is_not_kept_while_its_folders_are_changing_or_when_the_options_differ(cache, unlabeled_copy,
                                                                                          monkeypatch):
    (unlabeled_copy / "2024-01" / "day0" / "new.png").write_bytes(b"")  # its folder changed just now
    source_splits(unlabeled_copy, "auto", 0.1)
    assert not list(cache.glob("*.npz"))
    _settle(unlabeled_copy)
    with monkeypatch.context() as patched:
        patched.setenv("LOCAL_RANK", "1")  # a second rank of the machine leaves the writing to the first
        source_splits(unlabeled_copy, "auto", 0.1)
    assert not list(cache.glob("*.npz"))
    base = _flat(source_splits(unlabeled_copy, "auto", 0.1))
    other = _flat(source_splits(unlabeled_copy, "auto", 0.3))
    assert len(list(cache.glob("*.npz"))) == 2 and len(other[1][1][0]) > len(base[1][1][0])


def test_a_kept_listing_cut_short_is_listed_again(cache, unlabeled_copy):
    first = _flat(source_splits(unlabeled_copy, "auto", 0.1))
    (kept,) = cache.glob("*.npz")
    kept.write_bytes(kept.read_bytes()[:1000])
    assert _flat(source_splits(unlabeled_copy, "auto", 0.1)) == first


def test_a_relative_spelling_of_the_source_gets_paths_spelled_the_same_way(cache, unlabeled_copy, monkeypatch):
    absolute = source_splits(unlabeled_copy, "auto", 0.1)
    monkeypatch.chdir(unlabeled_copy.parent)
    relative = source_splits(Path(unlabeled_copy.name), "auto", 0.1)
    assert [p for p, _ in relative[1].files] == [os.path.relpath(p, unlabeled_copy.parent)
                                                 for p, _ in absolute[1].files]
