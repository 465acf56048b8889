"""Where a converted data set's splits are: ROOT/train.beton and ROOT/val.beton (FFCV), ROOT/train/ and ROOT/val/
shard folders (DALI), with the val split taken from `data.val_path` (`--val-data`) when it names one."""
from __future__ import annotations

from pathlib import Path

from ddmim.data.layout import CLASSES_FILE, read_classes_file
from ddmim.errors import UserError

VAL_DATA = {"ffcv": "a .beton file or a converted folder holding val.beton",
            "dali": "a folder of shards with their .idx indexes or a converted folder holding val/"}


def split_path(root: Path, split: str, fmt: str, val_path: str = "") -> Path:
    """The .beton file (ffcv) or shard folder (dali) of `split`."""
    own = Path(root) / (f"{split}.beton" if fmt == "ffcv" else split)
    if split != "val" or not val_path:
        return own
    path = Path(val_path)
    if fmt == "ffcv":
        found = path / "val.beton" if path.is_dir() else path if path.suffix == ".beton" else None
    else:
        found = path if any(path.glob("*.tar")) else path / "val"
    if found is None or not (found.is_file() if fmt == "ffcv" else any(found.glob("*.tar"))):
        raise UserError(f"--val-data for {fmt.upper()} data is {VAL_DATA[fmt]}; {path} is not")
    theirs, ours = read_classes_file(found.parent), read_classes_file(Path(root))
    if theirs is not None and ours is not None and theirs != ours:
        raise UserError(f"--val-data {path} was converted with other classes than {root} (their {CLASSES_FILE} "
                        "differ): its labels would mean other classes")
    return found
