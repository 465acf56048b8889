"""data_prep/to_ffcv.py and data_prep/to_dali.py: odd and broken files, atomic outputs, bad input."""
import io
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep import to_dali, to_ffcv
from data_prep.scan import run_cli

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


def test_ffcv_converter_keeps_odd_images_and_reports_broken_ones(messy_source, tmp_path):
    import torch

    from ddmim.config import make_config
    from ddmim.data.ffcv_loader import make_loader

    assert to_ffcv.main([str(messy_source), str(tmp_path), "--workers", "2"]) == 0
    assert set(read_skipped(tmp_path)) == {"truncated.JPEG", "empty.JPEG", "notes.JPEG"}
    cfg = make_config("tiny", ["data.num_workers=1"])
    loader = make_loader(tmp_path / "train.beton", cfg, train=False, device=torch.device("cpu"), batch_size=4,
                         drop_last=False)
    labels = sorted(int(y) for _, batch in loader for y in batch)
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
    (tmp_path / "flat" / "train").mkdir(parents=True)
    (tmp_path / "flat" / "train" / "x.JPEG").write_bytes(b"")
    assert run_cli(module.main, [str(tmp_path / "flat"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no class folders" in err and "\n" not in err
    assert not (tmp_path / "out" / "train.beton").exists() and not (tmp_path / "out" / "train").exists()


@pytest.mark.parametrize("script, tmp_glob, final", [
    ("to_ffcv.py", ".train.beton.tmp-*", "train.beton"),
    ("to_dali.py", ".train.tmp-*", "train"),
])
def test_interrupted_conversion_leaves_nothing_a_loader_accepts(script, tmp_glob, final, tmp_path):
    from ddmim.data.dali_loader import list_shards
    from ddmim.data.ffcv_loader import open_beton
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
        open_beton(dst / final) if final.endswith(".beton") else list_shards(dst / final)
