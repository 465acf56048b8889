import json

import torch

from ddmim.config import make_config
from ddmim.train.launch import Launch
from ddmim.train.pretrain import pretrain
from ddmim.train.pretrain_module import DDMIMModule


def test_tiny_pretraining_on_sample_data_lowers_the_loss(sample_root, tmp_path):
    cfg = make_config("tiny", ["train.epochs=3", "data.num_workers=0"])
    summary = pretrain(cfg, sample_root, tmp_path / "run", Launch(progress_bar=False))
    assert summary["steps"] == 3 * (len(list((sample_root / "train").rglob("*.png"))) // cfg.train.batch_size)
    assert len(summary["val_loss_history"]) == 4  # before training and after each epoch
    assert summary["val_loss_last"] < 0.9 * summary["val_loss_first"]
    assert summary["train_images_per_s"] > 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val_loss_last"] == summary["val_loss_last"]
    assert (tmp_path / "run" / "logs" / "metrics.csv").read_text().count("val/recon") == 1

    # the last checkpoint restores the trained weights, teacher included
    restored = DDMIMModule.load_from_checkpoint(summary["checkpoint_last"])
    state = torch.load(summary["checkpoint_last"], weights_only=False)["state_dict"]
    assert any(k.startswith("model.teacher.") for k in state)
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_pretraining_runs_on_each_fast_format(converted, tmp_path):
    import pytest

    for backend in ("ffcv", "dali"):
        cfg = make_config("tiny", ["train.epochs=1", "train.batch_size=8", "data.num_workers=1"])
        summary = pretrain(cfg, converted[backend], tmp_path / backend, Launch(progress_bar=False))
        assert summary["steps"] == 48 // 8, backend
        assert len(summary["val_loss_history"]) == 2 and all(v == v for v in summary["val_loss_history"])
        assert summary["val_loss_last"] != pytest.approx(summary["val_loss_first"], rel=1e-6)


def test_benchmark_mode_reports_each_part(sample_root, tmp_path, monkeypatch, capsys):
    from ddmim.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where results go without --out
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--benchmark", "3", "--workers", "0",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model only" in out and "end to end" in out and "loader alone" in out
    saved = json.loads(next(tmp_path.glob("train-benchmark-*.json")).read_text())
    for key in ("model_only_images_per_s", "end_to_end_images_per_s", "loader_images_per_s", "flops_per_step"):
        assert saved[key] > 0, key
    assert 0 <= saved["loader_stall_share"] < 1 and saved["machine"]["cpu_count"] >= 1
    assert not list(tmp_path.glob("runs")), "a benchmark writes no run folder"
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--benchmark", "1", "--workers", "0",
                 "--no-progress"]) == 0
    assert list((tmp_path / "cache" / "ddmim" / "benchmarks").glob("train-benchmark-*.json"))


def test_throughput_reports_give_images_memory_and_flops(sample_root, tmp_path, capsys):
    import csv

    cfg = make_config("tiny", ["train.report_every=5", "train.log_every=1", "data.num_workers=0", "train.epochs=1"])
    pretrain(cfg, sample_root, tmp_path / "run", Launch(max_steps=20, progress_bar=False))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 10", "step 15", "step 20"]  # 5 warm-up steps first
    assert all("images/s" in line and "data wait" in line and "peak memory" in line and "TFLOP/s" in line
               for line in lines)
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "logs" / "metrics.csv")) if r.get("perf/tflops_device")]
    assert all(float(r["perf/tflops_device"]) > 0 and float(r["perf/images_per_s"]) > 0 for r in rows)
    assert len({r["perf/tflops_device"] for r in rows}) == 3  # one measurement per report
