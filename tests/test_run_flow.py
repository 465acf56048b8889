"""The shared run flow, the backbone seam and the configuration each behave the same for every command."""
import json
import os
import signal
import time
import warnings

import pytest
import torch
import yaml
from torch import nn

from conftest import QUIET_STEPS
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.models import factory
from ddmim.models.swin import MaskedSwin


class ToyEncoder(nn.Module):
    """A two-stage convolutional encoder with the masked-encoder interface: one new entry is all it needs."""

    timm_name = "toy"

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, head_dim: int, **unused):
        super().__init__()
        self.grid, self.stride, self.embed_dim, self.num_features = img_size // patch_size, 2 * patch_size, \
            embed_dim, 2 * embed_dim
        self.timm_kwargs = {}
        self.patch = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.stages = nn.ModuleList([nn.Conv2d(embed_dim, embed_dim, 3, padding=1),
                                     nn.Conv2d(embed_dim, 2 * embed_dim, 2, 2)])
        self.norm = nn.LayerNorm(2 * embed_dim)
        self.head = nn.Linear(2 * embed_dim, head_dim)

    def forward_features(self, images, masks=None, mask_token=None, stages=None):
        x, taps = self.patch(images), []
        for stage, mask in zip(stages if stages is not None else self.stages, masks or [None, None]):
            if mask is not None:
                x = x * nn.functional.interpolate(mask[:, None], size=x.shape[-2:])
            x = stage(x)
            taps.append(x.permute(0, 2, 3, 1))
        return taps

    def normed(self, last):
        return self.norm(last)

    def forward_head(self, last, pre_logits=False):
        pooled = self.norm(last).mean(dim=(1, 2))
        return pooled if pre_logits else self.head(pooled)


def test_a_new_backbone_is_one_registry_entry(sample_root, tmp_path, monkeypatch):
    from ddmim.train.pretrain import pretrain

    monkeypatch.setitem(factory.BACKBONES, "toy", ToyEncoder)
    cfg = make_config("tiny", ["model.backbone=toy", "model.depths=[1,1]", "model.num_heads=[1,2]",
                               "mask.ratios=[0.5,0.0]", "ddmim.perceptual_weights=[1.0,0.1]",
                               "data.num_workers=0", "train.epochs=1"])
    summary = pretrain(cfg, sample_root, tmp_path / "run", QUIET_STEPS(2))
    assert summary["steps"] == 2 and summary["val_loss_last"] is not None
    state = torch.load(summary["checkpoint_last"], weights_only=False)["state_dict"]
    assert any(k.startswith("model.student.patch.") for k in state)


def test_unknown_backbone_is_one_line(capsys, sample_root):
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--set", "model.backbone=vgg"]) == 2
    assert "unknown backbone 'vgg'; available: swin_v2" in capsys.readouterr().err


def test_finetune_honours_compile(sample_root, tmp_path, monkeypatch):
    import ddmim.train.compile as compile_module

    compiled = []

    def fake_compile(fn, **options):  # torch.compile itself takes minutes on the CPU; what matters is that it is asked
        compiled.append(fn)
        return fn

    monkeypatch.setattr(compile_module.torch, "compile", fake_compile)
    assert main(["finetune", "--data", str(sample_root), "--preset", "tiny", "--compile", "--max-steps", "1",
                 "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "ft"), "--no-progress"]) == 0
    assert compiled and isinstance(compiled[0], nn.Module)
    saved = (tmp_path / "ft" / "config.yaml").read_text()
    assert "compile: true" in saved and "kernels" not in saved  # pretraining-only fields are not fine-tuning's
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["compile"] == "on" and summary["compile_backend"] == "inductor"


def test_finetune_refuses_pretraining_only_options(capsys, sample_root):
    assert main(["finetune", "--data", str(sample_root), "--preset", "tiny", "--set", "train.kernels=torch"]) == 2
    assert "unknown option train.kernels" in capsys.readouterr().err


def test_eval_takes_its_settings_from_the_checkpoint(sample_root, tmp_path, monkeypatch, capsys):
    import ddmim.eval.frozen as frozen

    run = tmp_path / "run"
    assert main(["train", "--data", str(sample_root), "--preset", "tiny", "--max-steps", "1", "--epochs", "1",
                 "--workers", "0", "--out", str(run), "--no-progress", "--set", "data.val_crop_ratio=0.5",
                 "--batch-size", "24"]) == 0
    seen = []
    original = frozen.eval_batches

    def spy(data, cfg, split, fmt, device=None, labels=False):
        seen.append((cfg.data.val_crop_ratio, cfg.train.batch_size, device))
        return original(data, cfg, split, fmt, device=device, labels=labels)

    monkeypatch.setattr(frozen, "eval_batches", spy)
    given = make_config("tiny")
    before = json.dumps(given.to_dict())
    assert main(["eval", "knn", "--data", str(sample_root), "--ckpt", str(run / "checkpoints" / "last.ckpt"),
                 "--preset", "tiny", "--set", "data.num_workers=0"]) == 0
    assert seen and all(ratio == 0.5 and batch == 24 for ratio, batch, _ in seen)
    assert seen[0][2] == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    frozen.evaluate("knn", sample_root, None, given, k=5)  # nothing it is given is changed
    assert json.dumps(given.to_dict()) == before


@pytest.mark.parametrize("tap", ["after_next_merge", "stage_output"])
def test_the_swin_encoder_reads_like_timm(tap):
    encoder = MaskedSwin(img_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                         mlp_ratio=2.0, drop_path_rate=0.0, head_dim=8, perceptual_tap=tap).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = encoder.forward_head(encoder.forward_features(images)[-1])
        theirs = encoder.net(images)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("best", ["/run/checkpoints/best-epoch000.ckpt", ""])
def test_the_summary_names_a_best_checkpoint_only_when_there_is_one(best):
    from ddmim.train.pretrain import format_summary

    summary = {"val_loss_first": 2.0, "val_loss_last": 1.0, "preset": "tiny", "steps": 3, "wall_s": 1.0,
               "global_batch": 64, "accumulate": 1, "world_size": 1, "accelerator": "cpu", "precision": "32",
               "train_images_per_s": 1.0, "data_wait_share": 0.1,
               "resumed_from": None, "compile": "off", "run_dir": "/run", "logs": "/run/logs/metrics.csv",
               "tensorboard": "/run/tensorboard", "checkpoint_last": "/run/checkpoints/last.ckpt",
               "checkpoint_best": best}
    line = format_summary(summary).splitlines()[-1]
    assert line.startswith("  checkpoints     /run/checkpoints/last.ckpt (last)")
    assert (f", {best} (best val loss)" in line) == bool(best) and ",  (" not in line


def test_the_last_step_is_saved_and_resumes_as_if_the_run_went_on(sample_root, tmp_path):
    """--max-steps 5 between two periodic checkpoints: last.ckpt held step 4 while the summary said 5
    steps and named it. Now it holds step 5, and a resume from it to step 7 gives
    the weights of a run of 7 steps."""
    from ddmim.train.pretrain import format_summary, pretrain

    def run(out, steps, resume=False):
        cfg = make_config("tiny", ["train.batch_size=8", "data.num_workers=0", "train.ckpt_every_steps=2",
                                   "train.epochs=1"])
        return pretrain(cfg, sample_root, out, QUIET_STEPS(steps), resume=resume)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run(tmp_path / "a", 5)
    # the epoch ends unvalidated at --max-steps: the best checkpoint waits for a validation
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    last = torch.load(summary["checkpoint_last"], map_location="cpu", weights_only=False)
    assert summary["steps"] == last["global_step"] == 5
    # 5 steps are all warm-up: the throughput is null in strict JSON (it was NaN), and the printout says why
    written = json.loads((tmp_path / "a" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert written["train_images_per_s"] is None and written["data_wait_share"] is None
    assert "throughput      not measured: no step after the 5 warm-up steps" in format_summary(summary)
    run(tmp_path / "a", 7, resume=True)
    straight = run(tmp_path / "b", 7)
    resumed = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    expected = torch.load(straight["checkpoint_last"], map_location="cpu", weights_only=False)
    assert resumed["global_step"] == expected["global_step"] == 7
    for name, value in expected["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


def _holder(out, then) -> int:
    """A forked process that takes the run folder's lock and waits to be killed (pid returned once it holds it)."""
    from ddmim.train.run_folder import FolderLock

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            then(FolderLock(out))
            os.write(ready_w, b"1")
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def test_a_second_run_in_a_live_run_folder_is_refused_until_the_first_ends(tmp_path):
    """A requeued job while the first still runs, or two --resume auto: the second would interleave the history."""
    from ddmim.errors import UserError
    from ddmim.train.run_folder import open_run_folder

    out, cfg = tmp_path / "run", make_config("tiny")
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    pid = _holder(out, lambda lock: None)
    try:
        with pytest.raises(UserError, match=rf"run folder {out} is in use by another ddmim run \(.+:{pid}\)"):
            open_run_folder(out, cfg, True)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _, ckpt, lock = open_run_folder(out, cfg, True)  # the kernel dropped the killed run's lock
    assert ckpt is None
    lock.release()


def test_two_fresh_runs_into_one_empty_folder_are_one_run(tmp_path):
    from ddmim.errors import UserError
    from ddmim.train.run_folder import FolderLock, open_run_folder

    cfg = make_config("tiny")
    first = FolderLock(tmp_path)  # another open file: conflicts as another process's would
    with pytest.raises(UserError, match="in use by another ddmim run"):
        open_run_folder(tmp_path, cfg, False)
    first.release()
    _, _, lock = open_run_folder(tmp_path, cfg, False)
    lock.release()
    assert (tmp_path / "config.yaml").is_file()


def test_a_forked_loader_worker_does_not_keep_a_released_run_folder_locked(tmp_path):
    from ddmim.train.run_folder import FolderLock

    lock = FolderLock(tmp_path)
    ready_r, ready_w = os.pipe()
    worker = os.fork()  # as a DataLoader worker is: it inherits the lock's descriptor
    if worker == 0:
        os.write(ready_w, b"1")  # past the fork handlers
        time.sleep(600)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        lock.release()
        FolderLock(tmp_path).release()  # taken again while the worker lives
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
