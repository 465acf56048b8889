"""Bad input to `ddmim train`: one clear line on stderr, exit code 2, no traceback, nothing overwritten."""
import os
import subprocess
import sys

import pytest

from ddmim.cli import main


def _run(capsys, *args):
    code = main(["train", "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_data_path(capsys, tmp_path):
    code, err = _run(capsys, "--data", str(tmp_path / "nowhere"), "--preset", "tiny")
    assert code == 2
    assert err.startswith("ddmim: error:") and "does not exist" in err and "\n" not in err


def test_folder_without_images(capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    code, err = _run(capsys, "--data", str(tmp_path), "--preset", "tiny", "--out", str(tmp_path / "run"))
    assert code == 2 and "no training images in" in err and "(0 images in 1 class folders)" in err
    assert "\n" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset(capsys, sample_root):
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "gigantic")
    assert code == 2 and "unknown pretrain preset 'gigantic'" in err and "tiny" in err


def test_image_size_the_backbone_cannot_take(capsys, sample_root):
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--set", "model.img_size=40")
    assert code == 2 and "model.img_size=40" in err


def test_cuda_only_options_on_cpu(capsys, sample_root):
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--accelerator", "gpu")
    assert code == 2 and "no CUDA device" in err
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--precision", "16-mixed")
    assert code == 2 and "16-mixed" in err


def test_existing_run_folder_is_not_overwritten(capsys, sample_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.ckpt").write_bytes(b"precious")
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--out", str(out))
    assert code == 2 and "already exists" in err
    assert (out / "last.ckpt").read_bytes() == b"precious"


@pytest.mark.slow
def test_console_entry_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddmim", "train", "--data", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"ddmim: error: data path {tmp_path / 'missing'} does not exist"]


@pytest.mark.parametrize("preset", ["seed", "tiny"])
def test_config_command_prints_preset(capsys, preset):
    assert main(["config", "--preset", preset]) == 0
    assert f"name: {preset}" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_triton_kernels_without_cuda(capsys, sample_root, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--kernels", "triton")
    assert code == 2 and "--kernels triton needs a CUDA device" in err


def test_more_devices_than_gpus(monkeypatch):
    from ddmim.errors import UserError
    from ddmim.train.launch import Launch, resolve_launch

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(UserError, match="--devices 2 asks for more GPUs than this machine has \\(1\\)"):
        resolve_launch(Launch(accelerator="gpu", devices=2))


def test_benchmark_needs_positive_steps(capsys, sample_root):
    code, err = _run(capsys, "--data", str(sample_root), "--preset", "tiny", "--benchmark", "0")
    assert code == 2 and "--benchmark needs a positive number" in err


def test_bf16_on_a_gpu_without_it(monkeypatch):
    from ddmim.errors import UserError
    from ddmim.train.launch import Launch, resolve_launch

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="this GPU does not support bf16"):
        resolve_launch(Launch(accelerator="gpu", precision="bf16-mixed"))


def test_each_command_of_a_process_gets_a_notes_folder_of_its_own(monkeypatch):
    """Ranks leave their stop notes in a folder named in the environment their launcher passes on; a second
    command in one process (the tests, a notebook) once inherited the first one's name, whose folder was gone,
    so its ranks left no note and rank 0 could not say why a rank stopped."""
    from ddmim.train.rank_notes import NOTES_ENV, close_notes, open_notes

    monkeypatch.delenv(NOTES_ENV, raising=False)
    first = open_notes()
    close_notes(first)
    assert NOTES_ENV not in os.environ and not first.exists()
    second = open_notes()
    try:
        assert second.is_dir() and os.environ[NOTES_ENV] == str(second)
    finally:
        close_notes(second)


def test_a_rank_whose_notes_folder_is_removed_while_it_writes_stops_without_a_traceback(monkeypatch):
    """Two ranks stopped by the same bad input: rank 0 said why and removed the folder (`close_notes`) between
    rank 1's look at the folder and its write, and rank 1 printed a FileNotFoundError traceback (seen in CI
    beside a CPU hog). A write that fails while the folder is still there is not hidden."""
    from ddmim.train import rank_notes

    monkeypatch.delenv(rank_notes.NOTES_ENV, raising=False)
    folder = rank_notes.open_notes()
    write_text = rank_notes.write_text

    def rank_0_closes_first(path, text):
        rank_notes.close_notes(folder)
        monkeypatch.setenv(rank_notes.NOTES_ENV, str(folder))  # rank 1's environment still names it
        write_text(path, text)

    monkeypatch.setattr(rank_notes, "write_text", rank_0_closes_first)
    rank_notes.leave_note("a batch larger than the data")
    assert not folder.exists()

    folder = rank_notes.open_notes()
    try:
        def fails(path, text):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        monkeypatch.setattr(rank_notes, "write_text", fails)
        with pytest.raises(FileNotFoundError):
            rank_notes.leave_note("a batch larger than the data")
    finally:
        rank_notes.close_notes(folder)


def test_lightning_tips_and_its_pytree_deprecation_are_silenced_and_nothing_else():
    import logging
    import warnings

    from ddmim.train.trainer import quiet_third_party_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party_noise()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(...)` instead.", FutureWarning)
        warnings.warn("a real deprecation", FutureWarning)
    assert [str(w.message) for w in seen] == ["a real deprecation"]
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def record(msg: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 0, msg, (), None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging, try installing [litlogger](...)"))
    assert logger.filter(record("GPU available: False, used: False"))


def test_a_stop_line_is_written_in_one_piece(monkeypatch):
    """The ranks of a data-parallel run share stderr: with print's separate write of the newline (and
    PYTHONUNBUFFERED), a rank's 'ddmim: skipping ...' line began in the middle of another rank's error line."""
    import sys

    from ddmim.cli_failures import said
    from ddmim.data.bad_samples import SkippedSamples
    from ddmim.errors import UserError

    writes = []
    monkeypatch.setattr(sys, "stderr", type("Stream", (), {"write": lambda self, s: writes.append(s),
                                                           "flush": lambda self: None})())
    assert said(UserError("64 files in a row cannot be decoded")) == 2
    SkippedSamples(4).record(2, "a.jpg", "its JPEG data does not decode")
    assert writes == ["ddmim: error: 64 files in a row cannot be decoded\n",
                      "ddmim: skipping a sample that cannot be decoded: a.jpg (its JPEG data does not decode)\n"]
