"""Labels as sources write them, and sources described by a file: a list of images (`path` or `path,label` per
line), and ImageNet's official validation folder (one flat folder of JPEGs) labelled by its ground truth.

A list's relative paths are read against the list's folder; a header line (`path` or `path,label`) is skipped;
labels are class names, numbered in sorted order, or class indices. ImageNet's flat val takes its labels from
either ground truth, found beside val/ or up to three folders above it: `LOC_val_solution.csv` (the Kaggle
download: `ImageId,PredictionString`, the first word of which is the class folder's WordNet id), or the
devkit's `ILSVRC2012_validation_ground_truth.txt` (line n: the ILSVRC2012_ID of ILSVRC2012_val_<n>, 1-based)
with the devkit's `meta.mat` beside it, which maps those ids to WordNet ids (in their own order, not sorted;
read with scipy). An entry whose file is missing, or an image without ground truth, is listed as not read (and
so counted and named), never dropped silently.
"""
from __future__ import annotations

import csv
from pathlib import Path

from ddmim.errors import UserError

GROUND_TRUTH = "LOC_val_solution.csv"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_FOLDERS = (".", "data", "ILSVRC2012_devkit_t12/data")  # where a folder holds the devkit's files


def read_list(path: Path, unlabeled: int) -> tuple[list[str], list[tuple[str, int, str]], list[tuple[str, str]]]:
    """(classes, (path, label, key) of each listed file that exists, (path, reason) of the others); the key is
    the path as the list gives it (what the held-out split hashes); `unlabeled`: the label of an unlabeled list."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read the file list {path}: {exc}") from None
    if rows and [cell.strip().lower() for cell in rows[0]] in (["path"], ["path", "label"]):
        rows = rows[1:]
    widths = {len(row) for row in rows}
    if not rows or not widths <= {1, 2} or len(widths) > 1:
        raise UserError(f"{path} is no file list: every line must be `path` or every line `path,label` (found "
                        f"{len(rows)} lines of {sorted(widths)} fields)")
    classes = number_classes({row[1] for row in rows}) if widths == {2} else []
    index = {name: i for i, name in enumerate(classes)}
    files, ignored = [], []
    for row in rows:
        key = row[0].strip()
        where = Path(key) if Path(key).is_absolute() else path.parent / key
        label = index[class_name(row[1])] if classes else unlabeled
        if where.is_file():
            files.append((str(where), label, key))
        else:
            ignored.append((str(where), f"listed in {path.name} but missing: not read"))
    return classes, files, ignored


def class_name(text: str) -> str:
    """A label as written (a class name, or an index with or without leading zeros) -> its class's name."""
    text = text.strip()
    return str(int(text)) if text.isdigit() else text


def number_classes(labels: set[str]) -> list[str]:
    """The class order of labels as written: indices keep their numbers (every index up to the largest is a
    class), names are numbered in sorted order."""
    names = sorted({class_name(label) for label in labels})
    if names and all(name.isdigit() for name in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return names


def find_ground_truth(val: Path) -> Path | None:
    for folder in (val, *list(val.parents)[:4]):
        if (folder / GROUND_TRUTH).is_file():
            return folder / GROUND_TRUTH
        for inner in DEVKIT_FOLDERS:
            if (folder / inner / DEVKIT_TRUTH).is_file():
                return folder / inner / DEVKIT_TRUTH
    return None


def read_ground_truth(path: Path) -> dict[str, str]:
    """Image name without its extension -> WordNet id, from either ground truth."""
    if path.name == DEVKIT_TRUTH:
        return _read_devkit(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except (OSError, KeyError, IndexError, AttributeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not ImageNet's {GROUND_TRUTH} (ImageId,PredictionString): "
                        f"{type(exc).__name__}: {exc}") from None


def _read_devkit(path: Path) -> dict[str, str]:
    meta = path.with_name("meta.mat")
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise UserError(f"reading the devkit's {meta.name} needs scipy (pip install scipy), or use "
                        f"{GROUND_TRUTH} in place of {path.name}") from None
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = [int(line) for line in path.read_text().split()]
        return {f"ILSVRC2012_val_{n:08d}": wnids[i] for n, i in enumerate(ids, start=1)}
    except (OSError, ValueError, KeyError, TypeError, IndexError, MatReadError) as exc:
        raise UserError(f"{path} and {meta} are not ImageNet's devkit ground truth and class list (one "
                        f"ILSVRC2012_ID per line; meta.mat's synsets): {type(exc).__name__}: {exc}") from None
