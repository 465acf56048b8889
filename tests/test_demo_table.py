"""The README's demo table is what `ddmim demo` prints today: a fresh demo (seed 0), at the thread count of the
2-core machine that printed the README's, gives its figures within `TOLERANCE`, which covers the arithmetic of
another CPU, not a change of recipe. The thread count is fixed because it alone moved the k-NN figure by 2.9 points
(1 thread against 2): with 10 references per class, one changed neighbour vote moves it by 0.28."""
import re
from pathlib import Path

import pytest
import torch

from ddmim.data.sample_digits import build_few_label_sample
from ddmim.demo import run_demo

README = Path(__file__).resolve().parents[1] / "README.md"
TOLERANCE = {"knn": 2.0, "finetune": 2.0, "recon": 0.05}  # top-1 points; the reconstruction ratio
README_THREADS = 2  # torch's default on the machine that printed the README's table
ROW = re.compile(r"^(ddmim|simmim|mae|random init)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+x|-)$")


def readme_rows(text: str) -> dict[str, tuple[float, float, float | None]]:
    """The rows of the README's first demo table (the one under `make demo`)."""
    block = text.split("## The demo", 1)[1].split("```", 2)[1]
    rows = {}
    for line in block.splitlines():
        found = ROW.match(line.strip())
        if found:
            name, knn, ft, recon = found.groups()
            rows[name] = (float(knn), float(ft), None if recon == "-" else float(recon[:-1]))
    return rows


def test_the_readme_table_is_read_whole():
    rows = readme_rows(README.read_text())
    assert set(rows) == {"ddmim", "random init"} and rows["random init"][2] is None
    broken = README.read_text().replace("random init ", "random-init ", 1)
    assert set(readme_rows(broken)) == {"ddmim"}  # control: a row the pattern misses is missing


def test_the_k_nn_references_are_a_few_labelled_images_of_each_class_and_the_whole_val(sample_root, tmp_path):
    few = build_few_label_sample(sample_root, tmp_path / "few", 3)
    for split, expect in (("train", lambda names: sorted(names)[:3]), ("val", sorted)):
        classes = sorted(p.name for p in (sample_root / split).iterdir())
        assert sorted(p.name for p in (few / split).iterdir()) == classes == [str(d) for d in range(10)]
        for c in classes:
            assert sorted(p.name for p in (few / split / c).iterdir()) == expect(
                p.name for p in (sample_root / split / c).iterdir())
    (few / "train" / "0" / sorted(p.name for p in (few / "train" / "0").iterdir())[0]).unlink()
    assert len(list((build_few_label_sample(sample_root, tmp_path / "few", 3) / "train" / "0").iterdir())) == 2


@pytest.mark.slow
def test_a_fresh_demo_prints_the_readmes_table(tmp_path):
    threads = torch.get_num_threads()  # one under pytest-xdist (conftest)
    torch.set_num_threads(README_THREADS)
    try:
        summary = run_demo(tmp_path / "demo")
    finally:
        torch.set_num_threads(threads)
    got = {"ddmim": (summary["methods"]["ddmim"]["knn_top1"], summary["methods"]["ddmim"]["finetune_top1"],
                     summary["methods"]["ddmim"]["reconstruction"]["ratio"]),
           "random init": (summary["random_init"]["knn_top1"], summary["random_init"]["finetune_top1"], None)}
    for name, (knn, ft, recon) in readme_rows(README.read_text()).items():
        assert abs(got[name][0] - knn) <= TOLERANCE["knn"], (name, "k-NN", got[name][0], knn)
        assert abs(got[name][1] - ft) <= TOLERANCE["finetune"], (name, "fine-tune", got[name][1], ft)
        if recon is not None:
            assert abs(got[name][2] - recon) <= TOLERANCE["recon"], (name, "recon", got[name][2], recon)
    assert got["ddmim"][0] > got["random init"][0]  # the k-NN column ranks them (fine-tuning, on digits, does not)
