"""FFCV's memory per loader process does not grow with the data set: the page cache holds the .beton."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import to_ffcv

MEASURE = """
import json, sys
from pathlib import Path
import torch
from ddmim.config import make_config
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.loader_spec import LoaderSpec

def anon_kib():  # private (anonymous) resident memory: what a copy of the file would add
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

cfg = make_config("tiny", ["train.batch_size=16", "data.num_workers=2", f"data.ffcv_os_cache={sys.argv[2]}"])
start = peak = anon_kib()
loader = make_loader(Path(sys.argv[1]), LoaderSpec.of(cfg), train=True, device=torch.device("cpu"),
                     os_cache=cfg.data.ffcv_os_cache)
for _ in range(2):  # the first epoch also compiles (numba): the same for both files, so it cancels out
    for _ in loader:
        peak = max(peak, anon_kib())
print(json.dumps({"growth_mib": (peak - start) / 1024}))
"""


def _beton(root: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "src" / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert to_ffcv.main([str(root / "src"), str(root / "out"), "--workers", "2", "--splits", "train",
                         "--write-mode", "raw"]) == 0
    return root / "out" / "train.beton"


def _growth(beton: Path, os_cache: bool) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(beton), str(os_cache).lower()], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["growth_mib"]


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> tuple[Path, Path]:
    return _beton(tmp_path_factory.mktemp("small"), 40), _beton(tmp_path_factory.mktemp("large"), 800)


@pytest.mark.slow
def test_loader_memory_is_bounded_whatever_the_beton_size(betons):
    small, large = betons
    extra = (large.stat().st_size - small.stat().st_size) / 2**20  # about 85 MiB of raw pixels
    assert extra > 60
    assert _growth(large, True) - _growth(small, True) < 0.2 * extra
    # the other choice keeps a private copy of what it reads, so this measure can tell the two apart
    assert _growth(large, False) - _growth(small, False) > 0.5 * extra
