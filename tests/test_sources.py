"""Sources as users have them: a tree of unlabeled images at any depth, class folders without a val split; the
held-out validation images and what needs labels."""
import os
import shutil
from pathlib import Path

import pytest

from conftest import QUIET_STEPS
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.data.folder import FolderDataModule, list_splits
from ddmim.data.layout import list_tree
from ddmim.data.listing import UNLABELED, held_out
from ddmim.data.loader_spec import LoaderSpec
from ddmim.data.pixels import EXTENSIONS
from ddmim.errors import UserError


def _unlabeled_digits(sample_root: Path, to: Path) -> Path:
    """The digits without their classes: nested date folders, the same file names in different folders, a
    symlink loop, hidden files and a note that is no image."""
    for n, image in enumerate(sorted((sample_root / "train").rglob("*.png"))):
        folder = to / f"2024-{n % 3 + 1:02d}" / f"day{n % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / f"IMG_{n // 6:04d}.png")  # names repeat across folders
    (to / "2024-01" / "day0" / "loop").symlink_to(to)
    (to / ".DS_Store").write_bytes(b"x")
    (to / "2024-02" / ".thumbs").mkdir()
    (to / "2024-02" / "notes.txt").write_text("not an image")
    return to


@pytest.fixture(scope="module")
def unlabeled(sample_root, tmp_path_factory) -> Path:
    return _unlabeled_digits(sample_root, tmp_path_factory.mktemp("photos") / "photos")


def test_every_image_of_a_nested_tree_is_one_unlabeled_sample(unlabeled, sample_root):
    listing = list_tree(unlabeled, EXTENSIONS)
    images = sorted((sample_root / "train").rglob("*.png"))
    assert len(listing.files) == len(images) and len({p for p, _ in listing.files}) == len(images)
    assert {label for _, label in listing.files} == {UNLABELED}
    reasons = {Path(p).name: reason for p, reason in listing.ignored}
    assert "symlink loop" in reasons["loop"] and reasons[".DS_Store"].startswith("hidden")
    assert reasons[".thumbs"].startswith("hidden") and reasons["notes.txt"].startswith("not an image")


def test_the_held_out_images_stay_when_images_are_added(unlabeled, tmp_path):
    classes, train, val = list_splits(unlabeled, "auto", 0.05)
    assert classes == [] and 0 < len(val.files) < len(train.files)
    assert not {p for p, _ in train.files} & {p for p, _ in val.files}
    grown = tmp_path / "grown"
    shutil.copytree(unlabeled, grown, symlinks=True)
    for n, image in enumerate(sorted(unlabeled.rglob("*.png"))[:300]):
        shutil.copy(image, grown / "2024-01" / f"new_{n}.png")
    _, train2, val2 = list_splits(grown, "auto", 0.05)

    def relative(listing, root):
        return {Path(p).relative_to(root).as_posix() for p, _ in listing.files}

    assert relative(val, unlabeled) <= relative(val2, grown) and relative(train, unlabeled) <= relative(train2, grown)
    # the rule reads the relative path alone: every machine, rank and resume holds out the same images
    assert all(held_out(r, 0.05) for r in relative(val, unlabeled))
    assert not any(held_out(r, 0.05) for r in relative(train, unlabeled))


def test_class_folders_without_val_hold_out_part_of_train(sample_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sample_root / "train", src / "train")
    cfg = make_config("tiny", ["data.num_workers=0", "data.val_fraction=0.1"])
    data = FolderDataModule(src, LoaderSpec.of(cfg))
    images = sum(1 for _ in (sample_root / "train").rglob("*.png"))
    assert data.num_classes == 10 and len(data.train_set) + len(data.val_set) == images
    assert 0.05 < len(data.val_set) / images < 0.15 and {y for _, y in data.val_set.samples} <= set(range(10))


def test_pretraining_and_pictures_run_on_an_unlabeled_tree_and_what_needs_labels_says_so(unlabeled, tmp_path,
                                                                                       capsys):
    from ddmim.train.pretrain import pretrain

    cfg = make_config("tiny", ["data.num_workers=0", "train.batch_size=16", "data.val_fraction=0.05"])
    summary = pretrain(cfg, unlabeled, tmp_path / "run", QUIET_STEPS(3))
    assert summary["steps"] == 3 and summary["val_loss_last"] is not None
    ckpt = summary["checkpoint_last"]
    assert main(["visualize", "--ckpt", ckpt, "--data", str(unlabeled), "--out", str(tmp_path / "p.png")]) == 0
    capsys.readouterr()
    for argv in (["eval", "knn", "--data", str(unlabeled), "--ckpt", ckpt],
                 ["finetune", "--data", str(unlabeled), "--preset", "tiny", "--out", str(tmp_path / "ft"),
                  "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "has no labels (no class folders)" in err and "ROOT/train/<class>/<image>" in err, err
        assert "\n" not in err


def test_forcing_a_layout_the_files_do_not_have_is_one_line(unlabeled, sample_root):
    with pytest.raises(UserError, match="has no class folders"):
        list_splits(unlabeled, "imagefolder", 0.01)
    classes, train, _ = list_splits(sample_root / "train", "unlabeled", 0.01)  # class folders read as a tree
    assert classes == [] and len(train.files) > 1000
    empty = unlabeled.parent / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("")
    with pytest.raises(UserError, match=r"no training images in .*empty \(0 images without class folders"):
        FolderDataModule(empty, LoaderSpec.of(make_config("tiny")))
    assert os.listdir(empty) == ["readme.txt"]


def test_the_layout_option_of_the_command_line(unlabeled, tmp_path, capsys):
    argv = ["train", "--data", str(unlabeled), "--preset", "tiny", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main([*argv, "--data-layout", "imagefolder"]) == 2
    assert "--data-layout imagefolder: " in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_both_converters_write_an_unlabeled_tree_that_pretraining_reads(fmt, unlabeled, tmp_path, capsys):
    from data_prep import to_dali, to_ffcv
    from ddmim.data import eval_batches, make_datamodule
    from ddmim.train.pretrain import pretrain

    out = tmp_path / fmt
    assert (to_ffcv if fmt == "ffcv" else to_dali).main([str(unlabeled), str(out), "--workers", "1",
                                                          "--val-fraction", "0.05"]) == 0
    cfg = make_config("tiny", ["data.num_workers=1", "train.batch_size=16", "data.val_fraction=0.05"])
    _, train, val = list_splits(unlabeled, "auto", 0.05)
    labels = [y for _, y in eval_batches(out, cfg, "val")]
    assert sum(len(y) for y in labels) == len(val.files)  # the converter held out the loader's images
    assert {int(v) for y in labels for v in y} == {UNLABELED}
    assert make_datamodule(out, cfg).num_classes == 0
    summary = pretrain(cfg, out, tmp_path / "run", QUIET_STEPS(2))
    assert summary["steps"] == 2
    with pytest.raises(UserError, match="has no labels"):
        make_datamodule(out, cfg, labels=True)
    with pytest.raises(UserError, match="has no labels"):
        eval_batches(out, cfg, "train", labels=True)


def test_a_file_list_with_labels_missing_entries_and_relative_paths(sample_root, tmp_path):
    images = sorted((sample_root / "train").rglob("*.png"))[::7]
    (tmp_path / "lists").mkdir()
    lines = ["path,label"] + [f"{os.path.relpath(p, tmp_path / 'lists')},{p.parent.name}" for p in images]
    lines += [f"{images[0]},{images[0].parent.name}", "gone/missing.png,3"]  # an absolute path; a missing file
    (tmp_path / "lists" / "train.csv").write_text("\n".join(lines) + "\n")
    classes, train, val = list_splits(tmp_path / "lists" / "train.csv", "auto", 0.1)
    assert classes == [str(i) for i in range(10)]
    got = [*train.files, *val.files]
    assert len(got) == len(images) + 1 and all(Path(p).parent.name == str(y) for p, y in got)
    assert [(Path(p).name, reason) for p, reason in train.ignored] == [
        ("missing.png", "listed in train.csv but missing: not read")]
    (tmp_path / "plain.txt").write_text("\n".join(str(p) for p in images) + "\n")
    classes, train, val = list_splits(tmp_path / "plain.txt", "auto", 0.1)
    assert classes == [] and len(train.files) + len(val.files) == len(images)
    with pytest.raises(UserError, match="lists images without labels"):
        list_splits(tmp_path / "plain.txt", "auto", 0.1, labels=True)
    (tmp_path / "mixed.txt").write_text(f"{images[0]}\n{images[1]},3\n")
    with pytest.raises(UserError, match="every line must be `path` or every line `path,label`"):
        list_splits(tmp_path / "mixed.txt", "auto", 0.1)


@pytest.fixture
def imagenet_download(sample_root, tmp_path):
    """The layout of ImageNet's download: train/<wnid>/*, val/ one flat folder, LOC_val_solution.csv above."""
    root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC"
    wnids = {str(d): f"n0{d}000000" for d in range(10)}
    for digit, wnid in wnids.items():
        shutil.copytree(sample_root / "train" / digit, root / "train" / wnid)
    (root / "val").mkdir()
    rows, truth = ["ImageId,PredictionString"], {}
    for n, image in enumerate(sorted((sample_root / "val").rglob("*.png"))):
        name = f"ILSVRC2012_val_{n + 1:08d}"
        shutil.copy(image, root / "val" / f"{name}.png")
        truth[name] = wnids[image.parent.name]
        if n != 5:  # one image without ground truth: named, not read
            rows.append(f"{name},{truth[name]} 1 2 30 31 {truth[name]} 3 4 20 21")
    return root, rows, truth


def test_imagenets_flat_val_takes_its_labels_from_the_ground_truth(imagenet_download, tmp_path):
    root, rows, truth = imagenet_download
    with pytest.raises(UserError, match=r"LOC_val_solution.csv \(or the devkit's .*\) beside it or in a folder above"):
        list_splits(root, "auto", 0.01)
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    classes, _, val = list_splits(root, "auto", 0.01)
    wnids = sorted(set(truth.values()))
    assert classes == wnids and len(val.files) == len(truth) - 1
    assert all(classes[label] == truth[Path(p).stem] for p, label in val.files)
    assert [Path(p).name for p, _ in val.ignored] == ["ILSVRC2012_val_00000006.png"]


def test_imagenets_flat_val_takes_its_labels_from_the_devkit(imagenet_download, tmp_path):
    """The devkit numbers its classes in its own order (meta.mat), not in sorted WordNet order."""
    import numpy as np
    from scipy.io import savemat

    root, _, truth = imagenet_download
    wnids = sorted(set(truth.values()))
    ilsvrc_id = {wnid: len(wnids) - i for i, wnid in enumerate(wnids)}  # reversed: sorted order would mislabel
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    synsets = np.array([(ilsvrc_id[w], w) for w in wnids], dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    savemat(data / "meta.mat", {"synsets": synsets})
    names = sorted(truth)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ilsvrc_id[truth[n]]}\n" for n in names))
    classes, _, val = list_splits(root, "auto", 0.01)
    assert classes == wnids and len(val.files) == len(truth)
    assert all(classes[label] == truth[Path(p).stem] for p, label in val.files)
    (data / "meta.mat").write_bytes(b"not a mat file")
    with pytest.raises(UserError, match="not ImageNet's devkit ground truth"):
        list_splits(root, "auto", 0.01)


def test_the_dali_converter_labels_a_file_list_and_imagenets_flat_val_as_the_folder_loader(imagenet_download,
                                                                                          tmp_path):
    from test_converters import shard_samples

    from data_prep import to_dali

    root, rows, truth = imagenet_download
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    _, _, val = list_splits(root, "auto", 0.01)
    assert to_dali.main([str(root), str(tmp_path / "dali"), "--workers", "1", "--splits", "val"]) == 0
    assert sorted(y for _, y in shard_samples(tmp_path / "dali" / "val")) == sorted(y for _, y in val.files)
    listed = sorted((root / "train").rglob("*.png"))[::5]
    (tmp_path / "list.csv").write_text("".join(f"{p},{p.parent.name}\n" for p in listed))
    classes, train, val = list_splits(tmp_path / "list.csv", "auto", 0.05)
    assert to_dali.main([str(tmp_path / "list.csv"), str(tmp_path / "from_list"), "--workers", "1",
                         "--val-fraction", "0.05"]) == 0
    for split, listing in (("train", train), ("val", val)):
        assert sorted(y for _, y in shard_samples(tmp_path / "from_list" / split)) == sorted(
            y for _, y in listing.files), split


def test_the_online_knn_asks_for_labels_before_any_step(unlabeled, sample_root, tmp_path):
    from ddmim.errors import UserError
    from ddmim.train.launch import Launch
    from ddmim.train.pretrain import pretrain

    cfg = make_config("tiny", ["data.num_workers=0", "eval.every_epochs=1", "train.epochs=1"])
    with pytest.raises(UserError, match="eval.every_epochs needs a labeled source"):
        pretrain(cfg, unlabeled, tmp_path / "run", Launch(progress_bar=False, max_steps=1))
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing that blocks the next
