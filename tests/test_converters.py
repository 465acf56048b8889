"""data_prep/to_ffcv.py and data_prep/to_dali.py: odd and broken files, atomic outputs, bad input."""
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep import to_dali, to_ffcv
from data_prep.conversion import run_cli
from ddmim.data.loader_spec import LoaderSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def messy_source(tmp_path_factory) -> Path:
    """ImageNet's oddities: grayscale, CMYK and PNG-named-.JPEG files (kept), plus three unreadable files."""
    root = tmp_path_factory.mktemp("messy")
    good, odd = root / "train" / "good", root / "train" / "odd"
    good.mkdir(parents=True)
    odd.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (50, 40), (10 * i, 100, 200)).save(good / f"rgb{i}.JPEG")
    Image.new("L", (40, 30), 90).save(odd / "gray.JPEG")
    Image.new("CMYK", (40, 30), (0, 128, 255, 0)).save(odd / "cmyk.JPEG")
    Image.new("RGBA", (40, 30), (200, 10, 10, 255)).save(odd / "png.JPEG", format="PNG")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    (odd / "truncated.JPEG").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (odd / "empty.JPEG").write_bytes(b"")
    (odd / "notes.JPEG").write_text("this is not an image\n")
    return root


def read_skipped(dst: Path) -> dict[str, str]:
    lines = (dst / "skipped.tsv").read_text().splitlines()[1:]
    return {Path(line.split("\t")[1]).name: line.split("\t")[2] for line in lines}


def shard_samples(folder: Path) -> list[tuple[Image.Image, int]]:
    samples = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            for jpg, cls in zip(members[::2], members[1::2]):
                assert jpg.name.endswith(".jpg") and cls.name.endswith(".cls")
                image = Image.open(io.BytesIO(tar.extractfile(jpg).read()))
                image.load()
                samples.append((image, struct.unpack("<i", tar.extractfile(cls).read())[0]))
    return samples


def test_dali_converter_keeps_odd_images_and_reports_broken_ones(messy_source, tmp_path, capsys):
    assert to_dali.main([str(messy_source), str(tmp_path), "--workers", "2"]) == 0
    assert set(read_skipped(tmp_path)) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    assert "empty file" in read_skipped(tmp_path)["empty.JPEG"]
    samples = shard_samples(tmp_path / "train")
    assert len(samples) == 6
    assert all(image.mode == "RGB" and image.format == "JPEG" for image, _ in samples)
    assert sorted(label for _, label in samples) == [0, 0, 0, 1, 1, 1]  # good=0, odd=1 as ImageFolder numbers them
    assert (tmp_path / "train" / "shard-000000.idx").read_text().startswith("v1.2 6\n")
    assert "wrote 6 images" in capsys.readouterr().out


def test_dali_shards_whose_every_file_is_skipped_are_left_out(messy_source, tmp_path):
    from ddmim.data.dali_format import list_shards, sample_count

    assert run_cli(to_dali.main, [str(messy_source), str(tmp_path), "--workers", "1", "--shard-size", "1"]) == 0
    tars, indexes = list_shards(tmp_path / "train")
    assert len(tars) == 6 and sample_count(indexes) == 6 and len(read_skipped(tmp_path)) == 3


def test_ffcv_converter_keeps_odd_images_and_reports_broken_ones(messy_source, tmp_path):
    import torch

    from ddmim.config import make_config
    from ddmim.data.ffcv_loader import make_loader

    assert to_ffcv.main([str(messy_source), str(tmp_path), "--workers", "2"]) == 0
    assert set(read_skipped(tmp_path)) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    cfg = make_config("tiny", ["data.num_workers=1"])
    loader = make_loader(tmp_path / "train.beton", LoaderSpec.of(cfg), train=False, device=torch.device("cpu"),
                         batch_size=4, drop_last=False)
    labels = sorted(int(y) for _, batch in loader for y in batch)
    assert labels == [0, 0, 0, 1, 1, 1]


def test_a_beton_holds_exactly_the_decodable_images_for_any_ffcv_reader(messy_source, tmp_path):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    assert to_ffcv.main([str(messy_source), str(tmp_path), "--workers", "2"]) == 0
    reader = Reader(str(tmp_path / "train.beton"))  # 6 images decode of the 9 files: 6 samples, none 8 x 8
    images = reader.metadata[f"f{reader.field_names.index('image')}"]
    assert reader.num_samples == 6 and sorted(zip(images["height"], images["width"])) == [(30, 40)] * 3 + [(40, 50)] * 3
    # a plain FFCV pipeline, as a user of the converted data set writes it: only real images, labels in range
    loader = Loader(str(tmp_path / "train.beton"), batch_size=2, num_workers=1, order=OrderOption.SEQUENTIAL,
                    pipelines={"image": [CenterCropRGBImageDecoder((16, 16), 1.0)], "label": [IntDecoder()]})
    labels = sorted(int(y) for _, batch in loader for y in batch.reshape(-1))
    assert labels == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("module, output", [(to_ffcv, "train.beton"), (to_dali, "train")])
def test_existing_output_is_refused_and_kept(module, output, messy_source, tmp_path, capsys):
    assert module.main([str(messy_source), str(tmp_path), "--workers", "1"]) == 0
    target = tmp_path / output
    stamp = {p: p.stat().st_mtime_ns for p in [target, *target.glob("*")]}
    assert run_cli(module.main, [str(messy_source), str(tmp_path), "--workers", "1"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


@pytest.mark.parametrize("module", [to_ffcv, to_dali])
def test_bad_sources(module, tmp_path, capsys):
    assert run_cli(module.main, [str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "flat" / "train").mkdir(parents=True)  # an unlabeled tree, whose one image does not decode
    (tmp_path / "flat" / "train" / "x.JPEG").write_bytes(b"")
    assert run_cli(module.main, [str(tmp_path / "flat"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: none of the 1 files of train decodes"), err
    assert not (tmp_path / "out" / "train.beton").exists() and not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("script, tmp_glob, final", [
    ("to_ffcv.py", ".train.beton.tmp-*", "train.beton"),
    ("to_dali.py", ".train.partial", "train"),
])
@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing_a_loader_accepts(script, tmp_glob, final, tmp_path):
    from ddmim.data.dali_format import list_shards
    from ddmim.data.ffcv_loader import readable_indices
    from ddmim.errors import UserError

    src = tmp_path / "src"
    (src / "train" / "photo").mkdir(parents=True)
    for i in range(400):
        Image.effect_noise((256, 256), 40 + i % 50).convert("RGB").save(src / "train" / "photo" / f"{i}.JPEG")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, str(REPO / "data_prep" / script), str(src), str(dst), "--workers", "1",
                             "--splits", "train"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(dst.glob(tmp_glob)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(dst.glob(tmp_glob)), "the converter was not caught while writing"
    assert not (dst / final).exists()
    with pytest.raises(UserError):
        readable_indices(dst / final) if final.endswith(".beton") else list_shards(dst / final)


def _noise_source(root: Path, count: int, size: int = 96) -> Path:
    (root / "train" / "photo").mkdir(parents=True)
    for i in range(count):
        Image.effect_noise((size, size), 40 + i % 50).convert("RGB").save(root / "train" / "photo" / f"{i}.JPEG")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background job"])
@pytest.mark.parametrize("script, final", [("to_ffcv.py", "train.beton"), ("to_dali.py", "train")])
def test_a_full_disk_ends_in_one_line_and_leaves_no_output(script, final, background, tmp_path):
    """Also as a job a shell starts in the background (`nohup ... &`), which ignores SIGINT: the FFCV
    converter's watcher interrupted its writer with SIGINT, and there every full-disk run hung."""
    import resource

    src = _noise_source(tmp_path / "src", 60, size=200)
    dst = tmp_path / "dst"

    def small_files():  # writes past 256 KiB fail as on a full disk (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        if background:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    one_shard = ["--shard-size", "1000"] if script == "to_dali.py" else []
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / script), str(src), str(dst), "--workers", "2",
                           "--splits", "train", *one_shard],
                          cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing into") and "Traceback" not in proc.stderr
    assert not (dst / final).exists()
    assert not [p for p in dst.iterdir() if ".tmp-" in p.name]  # the DALI work folder may stay, to resume


def test_stale_temporaries_are_removed_and_live_ones_refused(messy_source, tmp_path, capsys):
    dead = tmp_path / f".train.beton.tmp-{socket.gethostname()}:999999999"
    dead.write_bytes(b"x" * 100)
    old_style = tmp_path / ".train.beton.tmp-999999998"  # the older pid-only name
    old_style.write_bytes(b"x")
    assert to_ffcv.main([str(messy_source), str(tmp_path), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert not dead.exists() and not old_style.exists() and f"removed {dead}" in err
    # a killed run's temporary under this very process id (a restarted container reuses ids): stale too
    same_id = tmp_path / f".train.beton.tmp-{socket.gethostname()}:{os.getpid()}"
    same_id.write_bytes(b"x")
    assert to_ffcv.main([str(messy_source), str(tmp_path), "--workers", "1", "--overwrite"]) == 0
    assert not same_id.exists() and f"removed {same_id}" in capsys.readouterr().err
    with subprocess.Popen(["sleep", "60"]) as writer:  # a conversion that still runs
        live = tmp_path / f".train.beton.tmp-{socket.gethostname()}:{writer.pid}"
        live.write_bytes(b"x")
        assert run_cli(to_ffcv.main, [str(messy_source), str(tmp_path), "--workers", "1", "--overwrite"]) == 2
        writer.kill()
    assert f"another conversion (process {writer.pid})" in capsys.readouterr().err and live.exists()


@pytest.mark.slow
def test_a_killed_dali_conversion_resumes_from_its_last_shard(tmp_path):
    src = _noise_source(tmp_path / "src", 120)
    cmd = [sys.executable, str(REPO / "data_prep" / "to_dali.py"), str(src), str(tmp_path / "dst"), "--workers", "1",
           "--splits", "train", "--shard-size", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "dst" / ".train.partial"
    deadline = time.time() + 240
    while not (work / "shard-000001.tar").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (work / "shard-000001.tar").exists(), "the converter was not caught between shards"
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming a killed conversion" in resumed.stderr
    fresh = subprocess.run([*cmd[:3], str(tmp_path / "fresh"), *cmd[4:]], cwd=REPO, capture_output=True, timeout=300)
    assert fresh.returncode == 0
    for shard in sorted((tmp_path / "fresh" / "train").iterdir()):  # byte for byte what one run writes
        assert (tmp_path / "dst" / "train" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert not work.exists()


def test_labels_always_follow_the_train_classes(tmp_path, capsys):
    src = tmp_path / "src"
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("bee", "cat"))):  # val lacks "ant"
        for name in classes:
            (src / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), (9, 9, 9)).save(src / split / name / "a.JPEG")
    assert to_dali.main([str(src), str(tmp_path / "both"), "--workers", "1"]) == 0
    assert to_dali.main([str(src), str(tmp_path / "val_only"), "--workers", "1", "--splits", "val"]) == 0
    for dst in ("both", "val_only"):
        labels = sorted(label for _, label in shard_samples(tmp_path / dst / "val"))
        assert labels == [1, 2], dst  # bee and cat keep train's numbers
    # a later conversion of val alone, without the source's train folder, reads classes.json
    shutil.move(str(src / "train"), str(tmp_path / "train_elsewhere"))
    assert to_dali.main([str(src), str(tmp_path / "both"), "--workers", "1", "--splits", "val", "--overwrite"]) == 0
    assert sorted(label for _, label in shard_samples(tmp_path / "both" / "val")) == [1, 2]
    assert run_cli(to_dali.main, [str(src), str(tmp_path / "none"), "--workers", "1", "--splits", "val"]) == 2
    assert "labels come from the train split's classes" in capsys.readouterr().err
    (src / "val" / "dog").mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(src / "val" / "dog" / "a.JPEG")
    assert run_cli(to_dali.main, [str(src), str(tmp_path / "both"), "--workers", "1", "--splits", "val",
                                  "--overwrite"]) == 2
    assert "class folders that the train split lacks: dog" in capsys.readouterr().err


def test_folder_loader_labels_val_by_the_train_classes(tmp_path):
    from ddmim.data.folder import open_split

    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("bee", "cat"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / split / name / "a.JPEG")
    assert [label for _, label in open_split(tmp_path, "val", None).samples] == [1, 2]


def test_nested_folders_and_symlink_loops_are_reported_and_never_followed(tmp_path, capsys):
    from ddmim.data.folder import open_split

    src = tmp_path / "src"
    cls = src / "train" / "ant"
    (cls / "nested").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (9, 9, 9)).save(cls / f"{i}.JPEG")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(cls / "nested" / "deep.JPEG")
    (cls / "loop").symlink_to(src / "train")  # a loop back up the tree
    (cls / "linked.JPEG").symlink_to(cls / "0.JPEG")  # a link to a file is read as that file
    assert len(open_split(src, "train", None)) == 4
    assert "entries not read" in capsys.readouterr().err
    for module, out in ((to_dali, "dali"), (to_ffcv, "ffcv")):
        assert module.main([str(src), str(tmp_path / out), "--workers", "1", "--splits", "train"]) == 0
        assert "wrote 4 images" in capsys.readouterr().out
        reasons = read_skipped(tmp_path / out)
        assert set(reasons) == {"nested", "loop"} and all("not read" in r for r in reasons.values())


@pytest.mark.parametrize("module", [to_ffcv, to_dali])
def test_an_output_path_that_is_a_file(module, messy_source, tmp_path, capsys):
    (tmp_path / "file").write_text("precious")
    assert run_cli(module.main, [str(messy_source), str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: output {tmp_path / 'file'} exists and is not a folder"
    assert (tmp_path / "file").read_text() == "precious"


@pytest.mark.slow
def test_twenty_full_disks_in_a_row_never_hang_the_dali_converter(tmp_path):
    from benchmarks.full_disk_runs import run_many

    # 3 of 22 runs hung with multiprocessing.Pool.imap's abandoned chunks; half of these run beside a CPU hog
    runs = run_many("to_dali", "fsize", 20, 0.5, tmp_path, limit_s=30)
    bad = [r for r in runs if not r["ok"]]
    assert not bad, bad


# Runs a converter that kills itself (SIGKILL) at its K-th change to the filesystem (Python's audit events for
# renames, deletions and folder creation), or with K = 0 prints (event number, event, path) of every change: kill
# points chosen by what the run does, not by timing.
KILL_AT_EVENT = """
import os, runpy, signal, sys
k, seen = int(sys.argv.pop(1)), [0]
def hook(event, args):
    if event in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
        seen[0] += 1
        if k == 0:
            print(seen[0], event, args[0], file=sys.__stdout__, flush=True)
        elif seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _complete_output(dst: Path) -> int:
    """The seed of a complete DST/train (every shard with its index, all samples), or fails."""
    from ddmim.data.dali_format import list_shards, sample_count

    tars, indexes = list_shards(dst / "train")
    assert len(tars) == 150 and sample_count(indexes) == 150
    return json.loads((dst / "train" / "conversion.json").read_text())["seed"]


@pytest.mark.slow
def test_a_kill_at_any_moment_of_an_overwrite_leaves_the_old_or_the_new_output(tmp_path):
    src = tmp_path / "src"
    (src / "train" / "photo").mkdir(parents=True)
    for i in range(150):
        Image.new("RGB", (16, 16), (i, 0, 0)).save(src / "train" / "photo" / f"{i}.JPEG")
    dst = tmp_path / "dst"
    cmd = [sys.executable, str(REPO / "data_prep" / "to_dali.py"), str(src), str(dst), "--workers", "1",
           "--splits", "train", "--shard-size", "1"]
    assert subprocess.run([*cmd, "--seed", "1"], cwd=REPO, capture_output=True, timeout=300).returncode == 0
    overwrite = [sys.executable, "-c", KILL_AT_EVENT, "0", *cmd[1:], "--seed", "2", "--overwrite"]
    listing = subprocess.run(overwrite, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr[-2000:]
    events = [line.split(" ", 2) for line in listing.stdout.splitlines() if line[:1].isdigit()]
    publish = next(int(n) for n, event, path in events if event == "os.rename" and path.endswith(".train.partial"))
    assert any(event == "shutil.rmtree" for _, event, _ in events[publish:])  # the old output goes last
    assert subprocess.run([*cmd, "--seed", "1", "--overwrite"], cwd=REPO, capture_output=True,
                          timeout=300).returncode == 0
    # points while shards are written, and every change of the publish and of its deletion of the old output
    points = [publish // 2, publish - 1, *range(publish, min(len(events), publish + 3)), len(events) - 1]
    seeds = []
    for k in points:  # each from the same start: the seed-1 output complete, nothing else
        overwrite[3] = str(k)
        assert subprocess.run(overwrite, cwd=REPO, capture_output=True, timeout=300).returncode == -signal.SIGKILL
        if not (dst / "train").exists():  # set aside by the fallback publish: the next run puts it back
            subprocess.run([*cmd, "--seed", "1"], cwd=REPO, capture_output=True, timeout=300)
        seeds.append(_complete_output(dst))
        finish = subprocess.run([*cmd, "--seed", "2", "--overwrite"], cwd=REPO, capture_output=True, text=True,
                                timeout=300)  # whatever the kill left, the next run ends the job
        assert finish.returncode == 0, (k, finish.stderr[-2000:])
        assert _complete_output(dst) == 2 and not list(dst.glob(".train.*-*")) and not list(dst.glob(".*partial"))
        assert subprocess.run([*cmd, "--seed", "1", "--overwrite"], cwd=REPO, capture_output=True,
                              timeout=300).returncode == 0
    assert set(seeds) == {1, 2}, seeds  # the kills fell on both sides of the swap


def test_where_folders_cannot_be_swapped_a_set_aside_output_is_put_back(tmp_path, monkeypatch, capsys):
    from data_prep import conversion
    from ddmim import atomic

    final, new = tmp_path / "train", tmp_path / "new"
    final.mkdir()
    (final / "old.tar").write_text("old")
    new.mkdir()
    (new / "new.tar").write_text("new")
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # e.g. a filesystem without renameat2 exchange
    atomic.publish(new, final)
    assert [p.name for p in final.iterdir()] == ["new.tar"] and [p.name for p in tmp_path.iterdir()] == ["train"]
    # a kill between setting the old output aside and renaming the new one in: the next run puts the old back
    os.replace(final, tmp_path / f".train{atomic.OLD_MARK}{socket.gethostname()}:999999999")
    conversion.clear_stale(final)
    assert (final / "new.tar").read_text() == "new" and "put back" in capsys.readouterr().err


def _dies(item):
    os._exit(9)  # as a worker the kernel killed for memory


def test_a_conversion_worker_that_dies_ends_in_one_line_not_a_respawn():
    from data_prep.conversion import Workers
    from ddmim.errors import UserError

    workers = Workers(2)
    try:
        with pytest.raises(UserError, match="worker process of the conversion died.*fewer --workers than 2"):
            list(workers.imap(_dies, list(range(8)), "test"))
    finally:
        workers.close()
