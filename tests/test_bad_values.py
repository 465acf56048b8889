"""Every bad value a user can give ends in one `ddmim: error:` line and exit code 2, and writes nothing."""
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddmim.cli import main

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("ddmim: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize("option, expected", [
    (["--set", "model.window_size=0"], "model.window_size must be at least 1"),
    (["--set", "model.embed_dim=0"], "model.embed_dim must be at least 1"),
    (["--workers", "-3"], "data.num_workers must be at least 0"),
    (["--set", "train.ckpt_every_steps=-5"], "train.ckpt_every_steps must be at least 0"),
    (["--set", "optim.lr=.nan"], "optim.lr must be a finite number"),
    (["--set", "optim.lr=.inf"], "optim.lr must be a finite number"),
    (["--set", "data.interpolation=nearest"], "data.interpolation must be one of bilinear, bicubic"),
    (["--max-steps", "-7"], "--max-steps must be at least 1 (or -1: every epoch), got -7"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--seed", "-1"], "train.seed must be in [0, 2^32)"),
    (["--seed", str(2**32)], "train.seed must be in [0, 2^32)"),
    (["--workers", "100000"], "data.num_workers 100000 is more than 4 per core"),
])
def test_bad_training_values(option, expected, capsys, sample_root, tmp_path):
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out",
                                  str(tmp_path / "run"), *option])
    assert expected in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method, option", [("knn", ["--k", "-5"]), ("knn", ["--k", "0"]),
                                            ("linear", ["--epochs", "-1"]), ("knn", ["--temperature", "0"])])
def test_bad_evaluation_values(method, option, capsys, sample_root):
    assert "must be at least 1" in one_line_error(capsys, ["eval", method, "--data", str(sample_root), *option])


def test_bad_export_destinations(capsys, pretrain_ckpt, tmp_path):
    err = one_line_error(capsys, ["export", "--ckpt", str(pretrain_ckpt), "--out", "/proc/x"])
    assert "cannot write the export into /proc/x" in err
    (tmp_path / "file").write_text("precious")
    err = one_line_error(capsys, ["export", "--ckpt", str(pretrain_ckpt), "--out", str(tmp_path / "file")])
    assert "is an existing file" in err and (tmp_path / "file").read_text() == "precious"


def test_bad_picture_options(capsys, pretrain_ckpt, sample_root):
    base = ["visualize", "--ckpt", str(pretrain_ckpt), "--data", str(sample_root)]
    assert "cannot write the picture /proc/x.png" in one_line_error(capsys, [*base, "--out", "/proc/x.png"])
    assert "--num must be at least 1" in one_line_error(capsys, [*base, "--num", "0"])


def test_fine_tuning_on_a_single_class_is_refused(capsys, sample_root, tmp_path):
    for split in ("train", "val"):
        shutil.copytree(sample_root / split / "3", tmp_path / "one" / split / "3")
    err = one_line_error(capsys, ["finetune", "--data", str(tmp_path / "one"), "--preset", "tiny", "--out",
                                  str(tmp_path / "run"), "--no-progress"])
    assert "needs at least 2" in err and not (tmp_path / "run").exists()


def test_a_failed_start_leaves_no_folder_that_blocks_the_next(capsys, sample_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sample_root, data)
    broken = next((data / "val" / "0").iterdir())
    broken.write_bytes(broken.read_bytes()[:40])  # fails in the first validation, before any step
    base = ["train", "--data", str(data), "--preset", "tiny", "--workers", "0", "--no-progress", "--out",
            str(tmp_path / "run"), "--max-steps", "1"]
    assert main([*base, "--set", "data.max_bad_samples=0"]) == 2
    said = capsys.readouterr().err.strip().splitlines()  # the sample, named, then why the run stopped
    assert str(broken) in said[0] and said[-1].startswith("ddmim: error: stopped: 1 samples")
    assert not (tmp_path / "run").exists()
    assert main(base) == 0


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_earlier_ones(sample_root, tmp_path):
    import resource

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ddmim", "train", "--data", str(sample_root), "--preset", "tiny", "--out", str(out),
           "--workers", "0", "--no-progress", "--set", "train.ckpt_every_steps=2"]
    assert subprocess.run([*cmd, "--max-steps", "2"], cwd=REPO, capture_output=True, timeout=300).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.ckpt")}

    def small_files():  # a file write past 1 MiB fails as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = subprocess.run([*cmd, "--max-steps", "4", "--resume", "auto"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ddmim: error: writing checkpoint") and "already on disk are intact (" in last
    assert "the disk is full, or a file-size limit was reached" in last and "enforce fail" not in last
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").glob("*.ckpt")} == before
    fresh = subprocess.run([*cmd[:9], str(tmp_path / "fresh"), *cmd[10:], "--max-steps", "2"], cwd=REPO,
                           capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert "no earlier checkpoint of this run exists" in fresh.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_run_folder_deleted_during_training_is_one_line(sample_root, tmp_path):
    from helpers import Growth, ddmim_cmd, settings

    out = tmp_path / "run"
    cmd = ddmim_cmd("train", sample_root, out, "--max-steps", "200", "--workers", "0",
                    *settings(train__log_every=1))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = Growth(out / "logs" / "metrics.csv")
    while proc.poll() is None and not metrics():  # a training row is on disk: the run writes there
        time.sleep(0.05)
    shutil.rmtree(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ddmim: error: the run folder {out} was deleted or moved during the run"), last


def test_a_full_disk_anywhere_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    import errno

    from ddmim.cli_failures import said

    assert said(OSError(errno.ENOSPC, "No space left on device", "/runs/a/logs/metrics.csv")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddmim: error: No space left on device writing /runs/a/logs/metrics.csv: the disk is full")
    assert "\n" not in err
    assert said(OSError(errno.EACCES, "Permission denied", "/runs/a")) is None  # not a full disk: a traceback


def test_converted_data_without_its_library_is_one_line(capsys, converted, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ffcv", None)  # None in sys.modules: the import fails, as where it is absent
    assert main(["train", "--data", str(converted["ffcv"]), "--preset", "tiny", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "reading FFCV data needs the ffcv package" in err and "pip install 'ddmim[ffcv]'" in err
    assert len(err.strip().splitlines()) == 1


def test_a_batch_too_large_for_memory_is_one_line(capsys, sample_root, tmp_path, monkeypatch):
    from ddmim.models.ddmim import DDMIM

    def no_memory(*args, **kwargs):  # what the CPU allocator raises for a batch that does not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 94371840000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(DDMIM, "forward", no_memory)
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out",
                                  str(tmp_path / "run"), "--workers", "0", "--no-progress"])
    assert "out of memory" in err and "lower --batch-size" in err


def test_undecodable_files_in_a_row_in_a_loader_worker_are_one_line(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "junk").mkdir(parents=True)
        for i in range(70):
            (tmp_path / split / "junk" / f"{i:02d}.jpg").write_bytes(b"not an image")
    err = one_line_error(capsys, ["train", "--data", str(tmp_path), "--preset", "tiny", "--batch-size", "4",
                                  "--workers", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert "64 files in a row" in err and "Traceback" not in err


@pytest.mark.parametrize("content, expected", [
    (b"train: [1, 2\n", "is not YAML text: ParserError"),
    (b"- a\n- b\n", "holds a list, not sections of settings"),
    (b"\xff\xfe\x00binary", "is not YAML text: UnicodeDecodeError"),
    (b"base: 3\n", "base must name presets"),
])
def test_a_damaged_preset_file_is_one_line(content, expected, capsys, tmp_path, monkeypatch):
    """A preset a user added that does not parse, holds no mapping or names its bases wrongly (in a presets
    package of its own here, so that no other test sees it)."""
    import ddmim.config_engine

    package = f"user_presets_{tmp_path.name.rsplit('_', 1)[-1]}"  # one per case: a package stays imported
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    path = tmp_path / package / "damaged.yaml"
    path.write_bytes(content)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ddmim.config_engine.PRESET_PACKAGES, "pretrain", package)
    err = one_line_error(capsys, ["config", "--preset", "damaged"])
    assert str(path) in err and expected in err


def test_evaluating_at_another_size_than_the_checkpoint_is_one_line(capsys, pretrain_ckpt, sample_root):
    err = one_line_error(capsys, ["eval", "knn", "--data", str(sample_root), "--ckpt", str(pretrain_ckpt),
                                  "--set", "model.img_size=64"])
    assert "model.img_size=64" in err and "trained with model.img_size=32" in err


def test_an_out_folder_that_cannot_be_written_is_one_line(capsys, sample_root, tmp_path, monkeypatch):
    """An existing, empty, read-only --out (made so by refusing the write: root writes anywhere)."""
    import ddmim.atomic

    def refused(path, *args, **kwargs):
        if Path(path).name.startswith(".config.yaml"):  # the temporary config.yaml is written through
            raise PermissionError(13, "Permission denied", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(ddmim.atomic, "open", refused, raising=False)
    (tmp_path / "run").mkdir()
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out",
                                  str(tmp_path / "run"), "--no-progress"])
    assert f"cannot write {tmp_path / 'run' / 'config.yaml'}: Permission denied" in err


def _copied_run(pretrain_ckpt: Path, to: Path) -> Path:
    shutil.copytree(pretrain_ckpt.parent.parent, to)
    return to


def test_resuming_from_a_fine_tuning_checkpoint_in_a_pretraining_run_is_one_line(capsys, pretrain_ckpt,
                                                                                  finetune_ckpt, sample_root,
                                                                                  tmp_path):
    from ddmim.checkpoints import DIGEST_KEY, payload_digest

    run = _copied_run(pretrain_ckpt, tmp_path / "run")
    ckpt = torch.load(finetune_ckpt, map_location="cpu", weights_only=False)
    ckpt["global_step"] = 99999999  # the latest step: the one a resume takes
    ckpt[DIGEST_KEY] = payload_digest(ckpt)
    torch.save(ckpt, run / "checkpoints" / "step99999999.ckpt")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(run),
                                  "--resume", "auto", "--no-progress"])
    assert "step99999999.ckpt, is a finetune checkpoint, and this is a pretrain run" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing renamed or removed


@pytest.mark.parametrize("garbled", [b"model: [\x00\x01\n", b"- a\n- b\n"])
def test_resuming_a_run_whose_config_is_garbled_is_one_line(garbled, capsys, pretrain_ckpt, sample_root, tmp_path):
    run = _copied_run(pretrain_ckpt, tmp_path / "run")
    (run / "config.yaml").write_bytes(garbled)
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out", str(run),
                                  "--resume", "auto", "--no-progress"])
    assert f"{run / 'config.yaml'} is not a readable run config" in err
    assert (run / "config.yaml").read_bytes() == garbled


def test_a_dangling_out_link_is_named_as_such(capsys, sample_root, tmp_path):
    """mkdir on a link whose target is gone said "File exists"."""
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    err = one_line_error(capsys, ["train", "--data", str(sample_root), "--preset", "tiny", "--out",
                                  str(tmp_path / "run"), "--no-progress"])
    assert f"is a link to {tmp_path / 'gone'}, which does not exist" in err
    assert (tmp_path / "run").is_symlink() and not (tmp_path / "gone").exists()
