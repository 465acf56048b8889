"""`--val-data` (data.val_path): validation images from a source of their own, in every format; the training data
then keeps all its images."""
import shutil
from pathlib import Path

import pytest
from test_sources import _unlabeled_digits, imagenet_download  # noqa: F401 - a fixture

from ddmim.cli import build_parser
from ddmim.config import make_config
from ddmim.data import eval_batches, make_datamodule
from ddmim.data.folder import list_splits
from ddmim.data.listing import UNLABELED
from ddmim.errors import UserError


def _names(listing) -> list[str]:
    return [Path(p).name for p, _ in listing.files]


def test_imagenet_as_downloaded_in_two_folders(imagenet_download, tmp_path):  # noqa: F811
    root, rows, truth = imagenet_download
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    val_folder = tmp_path / "ILSVRC2012_img_val"
    shutil.move(root / "val", val_folder)  # train/ alone: without --val-data a part of it is held out
    _, held_train, held_val = list_splits(root, "auto", 0.1)
    assert len(held_val.files) > 0
    classes, train, val = list_splits(root, "auto", 0.1, val_path=str(val_folder))
    assert len(train.files) == len(held_train.files) + len(held_val.files)  # every training image trains
    assert len(val.files) == len(truth) - 1 and all(classes[y] == truth[Path(p).stem] for p, y in val.files)


def test_class_folders_of_their_own_and_a_file_list_are_labelled_by_the_training_classes(sample_root, tmp_path):
    classes, train, own_val = list_splits(sample_root, "auto", 0.1)
    split_folder = tmp_path / "holdout"
    shutil.copytree(sample_root / "val", split_folder)
    _, train2, val = list_splits(sample_root, "auto", 0.1, val_path=str(split_folder))
    assert _names(train2) == _names(train) and _names(val) == _names(own_val)
    assert [y for _, y in val.files] == [y for _, y in own_val.files]
    listed = tmp_path / "val.csv"
    listed.write_text("".join(f"{p},{classes[y]}\n" for p, y in own_val.files[::3]))
    _, _, from_list = list_splits(sample_root, "auto", 0.1, val_path=str(listed))
    assert list(from_list.files) == list(own_val.files[::3])
    (tmp_path / "plain.txt").write_text("".join(f"{p}\n" for p, _ in own_val.files))
    with pytest.raises(UserError, match="labelled training data needs `path,label` lines"):
        list_splits(sample_root, "auto", 0.1, val_path=str(tmp_path / "plain.txt"))
    (tmp_path / "other.csv").write_text(f"{own_val.files[0][0]},cat\n")
    with pytest.raises(UserError, match="cat, classes the training data lacks"):
        list_splits(sample_root, "auto", 0.1, val_path=str(tmp_path / "other.csv"))
    with pytest.raises(UserError, match="--val-data .*missing.* does not exist"):
        list_splits(sample_root, "auto", 0.1, val_path=str(tmp_path / "missing"))


def test_an_unlabeled_tree_trains_whole_and_validates_on_another(sample_root, tmp_path):
    photos = _unlabeled_digits(sample_root, tmp_path / "photos")
    _, held_train, held_val = list_splits(photos, "auto", 0.1)
    others = tmp_path / "others"
    shutil.copytree(sample_root / "val", others / "nested")
    classes, train, val = list_splits(photos, "auto", 0.1, val_path=str(others))
    assert classes == [] and len(train.files) == len(held_train.files) + len(held_val.files)
    assert len(val.files) == len(list(others.rglob("*.png"))) and {y for _, y in val.files} == {UNLABELED}


def _cfg(val_path: Path):
    return make_config("tiny", ["data.num_workers=0", "train.batch_size=16"], {"data.val_path": str(val_path)})


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_a_converted_set_validates_on_the_split_val_data_names(fmt, digits_ffcv, digits_dali, sample_root, tmp_path):
    root = digits_ffcv if fmt == "ffcv" else digits_dali
    plain = make_config("tiny", ["data.num_workers=0", "train.batch_size=16"])
    train_images = sum(len(y) for _, y in eval_batches(root, plain, "train"))
    own_val = sum(len(y) for _, y in eval_batches(root, plain, "val"))
    assert own_val < train_images
    named = root / "train.beton" if fmt == "ffcv" else root / "train"  # the training images, as a check
    assert sum(len(y) for _, y in eval_batches(root, _cfg(named), "val")) == train_images
    copy = tmp_path / "copy"  # a converted folder stands for its val split
    shutil.copytree(root, copy)
    assert sum(len(y) for _, y in eval_batches(root, _cfg(copy), "val")) == own_val
    assert make_datamodule(root, _cfg(named)).train_size == make_datamodule(root, plain).train_size
    (copy / "classes.json").write_text('{"a": 0, "b": 1}')
    with pytest.raises(UserError, match="other classes"):
        make_datamodule(root, _cfg(copy))
    with pytest.raises(UserError, match=f"--val-data for {fmt.upper()} data"):
        make_datamodule(root, _cfg(sample_root))


def test_the_command_line_sets_val_data_and_eval_reads_it_from_the_command_alone(tmp_path):
    from ddmim.cli import _typed

    args = build_parser().parse_args(["train", "--data", "d", "--val-data", str(tmp_path / "v 1")])
    assert _typed(args)["data.val_path"] == str(tmp_path / "v 1")
    args = build_parser().parse_args(["eval", "knn", "--data", "d"])
    assert args.val_data is None
