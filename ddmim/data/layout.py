"""Which files of an ImageNet-layout folder are images of which class: one rule for every format.

A split is ROOT/<split>/<class>/<file>. Only files directly inside a class folder belong to that class; a
sub-folder of a class folder is not read and is reported, and a folder is never followed below the class
level, so a symlink loop cannot multiply the data. A class folder may itself be a symlink (data sets are
often assembled that way), and a symlink to a file is read as that file.

Labels number the train split's class folders in sorted order (torchvision's ImageFolder numbering). A
converted data set keeps them in classes.json, so that converting or reading val on its own gives the same
labels. A class missing from val is fine; a class in val that train lacks is an error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddmim.errors import UserError

CLASSES_FILE = "classes.json"


@dataclass
class SplitListing:
    files: list[tuple[str, int]]  # (path, label), class by class, files sorted by name
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): sub-folders that were not read


def class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())  # follows a symlinked class folder


def read_classes_file(root: Path) -> list[str] | None:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        mapping = json.loads(path.read_text())
        names = sorted(mapping, key=mapping.get)
    except (OSError, ValueError, TypeError, AttributeError):
        raise UserError(f"{path} is unreadable (a converter in data_prep/ writes it)") from None
    if [mapping[n] for n in names] != list(range(len(names))):
        raise UserError(f"{path} does not number its classes 0..{len(names) - 1}")
    return names


def train_classes(root: Path, known: list[str] | None = None) -> list[str]:
    """The label order: `known` (a converted set's classes.json) or the sorted class folders of ROOT/train."""
    train = Path(root) / "train"
    found = class_folders(train) if train.is_dir() else None
    if known is not None:
        if found is not None and found != known:
            extra = sorted(set(found) ^ set(known))
            raise UserError(f"{train} has other class folders than the existing {CLASSES_FILE} "
                            f"(differing: {', '.join(extra[:5])}); convert into a new folder")
        return known
    if found is None:
        raise UserError(f"labels come from the train split's classes, but {train} does not exist (and there is no "
                        f"{CLASSES_FILE} of an earlier conversion)")
    if not found:
        raise UserError(f"{train} has no class folders (expected {train}/<class>/<image>)")
    return found


def list_split(root: Path, split: str, classes: list[str], extensions: tuple[str, ...] | None = None) -> SplitListing:
    """Every file of ROOT/<split>/<class>/ under `classes`' labels; `extensions` (lower case) filters by name."""
    split_dir = Path(root) / split
    present = class_folders(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has class folders that the train split lacks: {', '.join(unknown[:5])}")
    listing = SplitListing([])
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                listing.ignored.append((entry.path, "sub-folder of a class folder: not read"))
            elif not entry.is_file():
                listing.ignored.append((entry.path, "not a regular file (a broken link?): not read"))
            elif extensions is None or entry.name.lower().endswith(extensions):
                listing.files.append((entry.path, label))
    return listing


def read_class_count(root: Path) -> int:
    """Classes of a converted data set, from the classes.json its converter wrote."""
    names = read_classes_file(root)
    if names is None:
        raise UserError(f"{Path(root) / CLASSES_FILE} is missing (a converter in data_prep/ writes it)")
    return len(names)
