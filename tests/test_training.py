import csv
import json
import logging
import math

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddmim.config import make_config
from ddmim.train.curves import PANEL_HEIGHT, WIDTH
from ddmim.train.launch import Launch
from ddmim.train.pretrain import pretrain
from ddmim.train.pretrain_module import DDMIMModule


def test_tiny_pretraining_on_sample_data_lowers_the_loss(sample_root, tmp_path):
    cfg = make_config("tiny", ["train.epochs=3", "data.num_workers=0", "eval.every_epochs=1"])
    summary = pretrain(cfg, sample_root, tmp_path / "run", Launch(progress_bar=False))
    assert summary["steps"] == 3 * (len(list((sample_root / "train").rglob("*.png"))) // cfg.train.batch_size)
    assert len(summary["val_loss_history"]) == 4  # before training and after each epoch
    assert summary["val_loss_last"] < 0.9 * summary["val_loss_first"]
    assert summary["train_images_per_s"] > 0
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["val_loss_last"] == summary["val_loss_last"]
    assert (tmp_path / "run" / "logs" / "metrics.csv").read_text().count("val/recon") == 1

    # the online k-NN: before training and after each epoch, in the summary, the CSV and TensorBoard. On the
    # digits a random Swin's features already separate the classes well (85%); the first epoch's large steps
    # disturb them, then training improves them epoch after epoch
    knn = summary["val_knn_top1_history"]
    assert len(knn) == 4 and all(0 < v <= 100 for v in knn) and knn[1] < knn[2] < knn[3], knn
    assert saved["val_knn_top1_history"] == knn
    rows = list(csv.DictReader((tmp_path / "run" / "logs" / "metrics.csv").open()))
    assert [float(r["val/knn_top1"]) for r in rows if r.get("val/knn_top1")] == pytest.approx(knn)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val/knn_top1")] == pytest.approx(knn)
    assert saved["curves"] == str(tmp_path / "run" / "curves.png")
    assert Image.open(saved["curves"]).size == (WIDTH, 2 * PANEL_HEIGHT)  # the losses, and the k-NN

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


def test_benchmark_mode_reports_each_part(sample_root, tmp_path, monkeypatch, capsys, caplog):
    from ddmim.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where results go without --out
    caplog.set_level(logging.INFO)
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--benchmark", "3", "--workers", "0",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "model only" in out and "end to end" in out and "loader alone" in out
    # Lightning's advertising, which each of the benchmark's trainers logged
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()]
    saved = json.loads(next(tmp_path.glob("train-benchmark-*.json")).read_text())
    for key in ("model_only_images_per_s", "end_to_end_images_per_s", "loader_images_per_s", "flops_per_step"):
        assert saved[key] > 0, key
    assert 0 <= saved["loader_stall_share"] < 1 and saved["machine"]["cpu_count"] >= 1
    assert not list(tmp_path.glob("runs")), "a benchmark writes no run folder"
    capsys.readouterr()
    batch = saved["batch"]  # one step of a global batch of two: its micro-batches accumulated
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--benchmark", "1", "--workers", "0",
                 "--no-progress", "--set", f"train.global_batch={2 * batch}"]) == 0
    assert f"batch {batch} x 2 micro-batches a step" in capsys.readouterr().out
    cached = json.loads(next((tmp_path / "cache" / "ddmim" / "benchmarks").glob("train-benchmark-*.json")).read_text())
    assert cached["accumulate"] == 2 and cached["end_to_end_images_per_s"] > 0


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


def test_sixteen_bit_mixed_precision_trains_under_the_nonfinite_guard(tmp_path):
    """GradScaler sets and deletes the fused optimiser's found_inf itself; the guard must not delete it again
    (16-mixed is the `auto` choice on GPUs without bf16; Lightning's CPU GradScaler follows the same protocol).
    On the CPU, fp16 autocast makes SwinV2's forward NaN (the cosine attention's norms stay fp16 there), so every
    step is one that GradScaler skips: the guard and the scaler must count the same steps, and skip them."""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from ddmim.train.speed_test import OnDevice
    from ddmim.train.trainer import build_trainer

    torch.manual_seed(0)
    cfg = make_config("tiny", ["train.batch_size=4", "data.num_workers=0"])
    module = DDMIMModule(cfg.to_dict(), cuda=False)
    before = [p.detach().clone() for p in module.parameters()]
    run = build_trainer(tmp_path, cfg, Launch(accelerator="cpu", precision="32", max_steps=3, progress_bar=False))
    # Lightning turns 16-mixed on the CPU into bf16-mixed: its fp16 plugin, with a GradScaler, is put in by hand
    scaler = torch.amp.GradScaler("cpu", 256.0)
    run.trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler)
    batch = (torch.randn(4, 3, cfg.model.img_size, cfg.model.img_size), torch.zeros(4, dtype=torch.long))
    run.trainer.fit(module, train_dataloaders=OnDevice(batch, 3))
    assert run.trainer.global_step == 3
    halvings = round(math.log2(256.0 / scaler.get_scale()))
    assert halvings == module.skipped_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_the_curves_picture_draws_each_logged_series_in_its_colour(tmp_path):
    from ddmim.train.curves import PANELS, write_curves

    metrics = tmp_path / "metrics.csv"
    rows = ["step,train/loss,val/loss,val/knn_top1,lr-AdamW"]
    rows += [f"{s},{5 - s / 50},,,0.1" for s in range(0, 100, 5)] + ["0,,5.5,,", "99,,3.0,,", "99,,,nan,"]
    metrics.write_text("\n".join(rows) + "\n")
    picture = Image.open(write_curves(metrics, tmp_path / "curves.png")).convert("RGB")
    assert picture.size == (WIDTH, PANEL_HEIGHT)  # no k-NN values (one NaN): no k-NN panel
    colours = dict(PANELS[0][1])
    counts = {name: sum(1 for p in picture.getdata() if p == colour) for name, colour in colours.items()}
    assert counts["train/loss"] > 300 and counts["val/loss"] > 100, counts
    assert sum(1 for p in picture.getdata() if p == dict(PANELS[1][1])["val/knn_top1"]) == 0
    (tmp_path / "empty.csv").write_text("step,lr-AdamW\n0,0.1\n")
    assert write_curves(tmp_path / "empty.csv", tmp_path / "none.png") is None
