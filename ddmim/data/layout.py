"""Which files of a source are images, of which class if any: one rule for every format.

An ImageNet-layout folder (`imagefolder`) has ROOT/<split>/<class>/<file>; an unlabeled one (`unlabeled`) is any
tree of images, every image a sample without a label (`UNLABELED`); a file list (`list`) and ImageNet's flat val
are read by `label_files`, WebDataset shards (`wds`) by `tar_source`. A source without a val split holds out a
fraction of its images (`listing.split_off_val`). A folder tree's listing is kept between starts
(`listing_cache`).

In the imagefolder layout a split is ROOT/<split>/<class>/<file>. Only files directly inside a class folder
belong to that class; a sub-folder of a class folder is not read and is reported, and a folder is never followed
below the class level, so a symlink loop cannot multiply the data. A class folder may itself be a symlink (data sets are
often assembled that way), and a symlink to a file is read as that file.

Labels number the train split's class folders in sorted order (torchvision's ImageFolder numbering). A
converted data set keeps them in classes.json, so that converting or reading val on its own gives the same
labels. A class missing from val is fine; a class in val that train lacks is an error.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ddmim.data.label_files import DEVKIT_TRUTH, GROUND_TRUTH, find_ground_truth, read_ground_truth, read_list
from ddmim.data.listing import LABELED_LAYOUTS, UNLABELED, SplitListing, split_off_val
from ddmim.data.listing_cache import cached_splits
from ddmim.data.pixels import EXTENSIONS
from ddmim.data.sample_table import TableBuilder, table
from ddmim.data.tar_source import shard_files, wds_splits
from ddmim.errors import UserError

CLASSES_FILE = "classes.json"
LAYOUTS = ("auto", "imagefolder", "unlabeled", "list", "wds")


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
    files, ignored = TableBuilder(), []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        number = files.folder(os.path.join(str(folder), ""))
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir():
                ignored.append((entry.path, "sub-folder of a class folder: not read"))
            elif not entry.is_file():
                ignored.append((entry.path, "not a regular file (a broken link?): not read"))
            elif extensions is None or entry.name.lower().endswith(extensions):
                files.add_name(number, entry.name, label)
    return SplitListing(files.build(), ignored)


def read_class_count(root: Path) -> int:
    """Classes of a converted data set, from the classes.json its converter wrote."""
    names = read_classes_file(root)
    if names is None:
        raise UserError(f"{Path(root) / CLASSES_FILE} is missing (a converter in data_prep/ writes it)")
    return len(names)


def has_class_folders(root: Path) -> bool:
    train = Path(root) / "train"
    return train.is_dir() and bool(class_folders(train))


def resolve_layout(root: Path, layout: str, known: list[str] | None = None) -> str:
    """`layout` with auto told from the files: class folders under train/ make an imagefolder source, and so does
    the classes.json of an earlier conversion (`known`: its classes) with val/ alone."""
    labeled = has_class_folders(root) or (known is not None and (Path(root) / "val").is_dir())
    if layout == "auto":
        val = Path(root) / "val"
        if not labeled and not (Path(root) / "train").exists() and val.is_dir() and class_folders(val):
            train_classes(root, known)  # val/<class>/ alone: labelled images whose labels cannot be numbered
        return "imagefolder" if labeled else "unlabeled"
    if layout == "imagefolder" and not labeled:
        raise UserError(f"--data-layout imagefolder: {root} has no class folders (expected {root}/train/<class>/"
                        f"<image>); an image tree without classes is --data-layout unlabeled")
    return layout


def list_tree(root: Path, extensions: tuple[str, ...]) -> SplitListing:
    """Every image under `root`, at any depth, as an unlabeled sample, in sorted path order. A folder reached a
    second time (a symlink loop, or two links to one folder) is not read again; hidden entries and files that
    are not images (by `extensions`, lower case) are skipped and listed in `ignored`."""
    files, ignored, seen = TableBuilder(), [], set()

    def entries(folder: str):
        """(a folder's number, its entries in the order of the paths under them: a folder sorts as its name and
        a separator)."""
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in seen:
            ignored.append((folder, "a folder reached a second time (a symlink loop?): not read again"))
            return -1, iter(())
        seen.add((status.st_dev, status.st_ino))
        listed = sorted(os.scandir(folder), key=lambda e: e.name + os.sep if e.is_dir() else e.name)
        return files.folder(os.path.join(folder, "")), iter(listed)

    stack = [entries(str(root))]
    while stack:
        folder, listed = stack[-1]
        entry = next(listed, None)
        if entry is None:
            stack.pop()
        elif entry.name.startswith("."):
            ignored.append((entry.path, "hidden: not read"))
        elif entry.is_dir():
            stack.append(entries(entry.path))
        elif not entry.is_file():
            ignored.append((entry.path, "not a regular file (a broken link?): not read"))
        elif entry.name.lower().endswith(extensions):
            files.add_name(folder, entry.name, UNLABELED)
        else:
            ignored.append((entry.path, "not an image by its name: not read"))
    return SplitListing(files.build(), ignored)


def list_flat_val(val: Path, classes: list[str], extensions: tuple[str, ...] | None) -> SplitListing:
    """ImageNet's official val: one flat folder of images, labelled by its ground-truth file."""
    truth_file = find_ground_truth(val)
    if truth_file is None:
        raise UserError(f"{val} is a flat folder of images without class folders; for ImageNet's official val put "
                        f"its ground truth {GROUND_TRUTH} (or the devkit's {DEVKIT_TRUTH} and meta.mat) beside it "
                        "or in a folder above it")
    truth, index = read_ground_truth(truth_file), {n: i for i, n in enumerate(classes)}
    files, ignored = TableBuilder(), []
    for entry in sorted(os.scandir(val), key=lambda e: e.name):
        if not entry.is_file() or (extensions is not None and not entry.name.lower().endswith(extensions)):
            ignored.append((entry.path, "not an image file: not read"))
            continue
        wnid = truth.get(entry.name.rsplit(".", 1)[0])
        if wnid is None:
            ignored.append((entry.path, f"not in {truth_file.name}: not read"))
        elif wnid not in index:
            raise UserError(f"{truth_file} labels {entry.name} {wnid}, a class the train split lacks")
        else:
            files.add(entry.path, index[wnid])
    return SplitListing(files.build(), ignored)


def source_splits(root: Path, layout: str, val_fraction: float, labels: bool = False,
                  known: list[str] | None = None,
                  extensions: tuple[str, ...] | None = EXTENSIONS,
                  hold_out: str = "always") -> tuple[list[str], SplitListing, SplitListing]:
    """(classes, train listing, val listing) of a source; classes is empty for an unlabeled one, which
    `labels` refuses (k-NN, linear probe, fine-tuning). `known`: the label order of an earlier conversion;
    `extensions`: the files of class folders that count (None: all, as the converters read them; an image tree
    counts images by their names); `hold_out`: which sources without a val split hold images out for it
    (always, unlabeled: not class folders, never: all train, as where the val split is another source)."""
    root = Path(root)
    if layout == "wds" or (layout == "auto" and root.is_file() and shard_files(root)):
        return wds_splits(root, val_fraction, labels, known, hold_out)
    if root.is_file() and layout in ("auto", "list"):
        classes, entries, ignored = read_list(root, UNLABELED)
        if labels and not classes:
            raise UserError(f"{root} lists images without labels: this needs {LABELED_LAYOUTS}, or a list of "
                            f"`path,label` lines")
        listing = SplitListing(table((path, label) for path, label, _ in entries), ignored)
        if hold_out == "never":
            return classes, listing, SplitListing()
        return classes, *split_off_val(listing, root.parent, val_fraction, [key for _, _, key in entries])
    if not root.is_dir():
        raise UserError(f"data path {root} does not exist or is neither a folder nor a file list")
    if layout == "list":
        raise UserError(f"--data-layout list: {root} is a folder; give the file that lists the images")
    options = {"layout": layout, "val_fraction": val_fraction, "known": known, "extensions": extensions,
               "hold_out": hold_out}
    classes, train, val = cached_splits(root, options, lambda: _folder_splits(root, layout, val_fraction, labels,
                                                                              known, extensions, hold_out))
    if labels and not classes:
        raise _unlabeled(root)
    return classes, train, val


def _unlabeled(root: Path) -> UserError:
    return UserError(f"{root} has no labels (no class folders): this needs {LABELED_LAYOUTS}")


def _folder_splits(root: Path, layout: str, val_fraction: float, labels: bool, known: list[str] | None,
                   extensions: tuple[str, ...] | None, hold_out: str):
    """`source_splits` of a folder, and whether its listing may be kept (a tree of folders alone: not shards,
    not a flat val read through a ground-truth file)."""
    if layout == "auto" and not has_class_folders(root) and shard_files(root):
        return wds_splits(root, val_fraction, labels, known, hold_out), False
    layout = resolve_layout(root, layout, known)
    if labels and layout == "unlabeled":
        raise _unlabeled(root)
    if layout == "unlabeled":
        tree = list_tree(root, EXTENSIONS)
        return ([], *((tree, SplitListing()) if hold_out == "never" else split_off_val(tree, root, val_fraction))), True
    classes = train_classes(root, known)
    train, val = (list_split(root, split, classes, extensions) if (root / split).is_dir() else SplitListing()
                  for split in ("train", "val"))
    flat_val = (root / "val").is_dir() and not class_folders(root / "val") and any(os.scandir(root / "val"))
    if flat_val:
        val = list_flat_val(root / "val", classes, extensions)
    if hold_out == "always" and not (root / "val").is_dir():
        train, val = split_off_val(train, root / "train", val_fraction)
    return (classes, train, val), not flat_val


def val_listing(path: Path, classes: list[str], extensions: tuple[str, ...] | None = EXTENSIONS) -> SplitListing:
    """The images of `data.val_path` (`--val-data`), a validation split of its own. For labelled training data
    (`classes`): a file list of `path,label` lines, class folders PATH/<class>/<image> or ImageNet's flat val
    with its ground truth, labelled by the training classes; for unlabeled data, a file list or any tree."""
    path = Path(path)
    if path.is_file():
        named, entries, ignored = read_list(path, UNLABELED)
        if classes and not named:
            raise UserError(f"--val-data {path} lists images without labels; labelled training data needs "
                            "`path,label` lines")
        index = {name: i for i, name in enumerate(classes)}
        unknown = sorted({named[y] for _, y, _ in entries} - set(index)) if classes else []
        if unknown:
            raise UserError(f"--val-data {path} labels images {', '.join(unknown[:5])}, classes the training data "
                            "lacks")
        return SplitListing(table((p, index[named[y]] if classes else UNLABELED) for p, y, _ in entries), ignored)
    if not path.is_dir():
        raise UserError(f"--val-data {path} does not exist (a folder of images or a file list)")
    if not classes:
        return list_tree(path, EXTENSIONS)
    if class_folders(path):
        return list_split(path.parent, path.name, classes, extensions)
    return list_flat_val(path, classes, extensions)


def require_labels(root: Path) -> None:
    """Refuses a converted set without labels (its classes.json names none)."""
    if read_class_count(root) == 0:
        raise UserError(f"{root} has no labels (converted from images without class folders): this needs "
                        f"{LABELED_LAYOUTS}")
