"""Checkpoints written before the teacher-free SimMIM: read for pictures and export, refused for resuming in
one line. The old layout is made from a new checkpoint by adding what the old SimMIM also saved: a teacher,
a projection head, and their tensors in the optimiser state."""

import pytest
import torch

from conftest import QUIET_STEPS
from ddmim.checkpoints import DIGEST_KEY, payload_digest
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.errors import UserError


def _as_written_before(path) -> None:
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["state_dict"]
    state["model.teacher.0.blocks.0.norm1.weight"] = torch.ones(32)
    state["model.proj.0.weight"] = torch.zeros(128, 128)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    group["params"] = list(group["params"]) + [max(group["params"]) + 1 + i for i in range(6)]
    ckpt[DIGEST_KEY] = payload_digest(ckpt)  # as if written so: the old layout, not damage
    torch.save(ckpt, path)


def test_an_old_simmim_checkpoint_is_read_and_its_run_is_not_resumed(sample_root, tmp_path, capsys):
    from ddmim.train.pretrain import pretrain

    cfg = make_config("tiny_simmim", ["data.num_workers=0", "train.epochs=2"])
    run = tmp_path / "run"
    summary = pretrain(cfg, sample_root, run, QUIET_STEPS(2))
    for path in (run / "checkpoints").glob("*.ckpt"):
        _as_written_before(path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    assert main(["visualize", "--data", str(sample_root), "--ckpt", summary["checkpoint_last"],
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert main(["export", "--ckpt", summary["checkpoint_last"], "--out", str(tmp_path / "export")]) == 0
    capsys.readouterr()

    code = main(["train", "--data", str(sample_root), "--preset", "tiny_simmim", "--out", str(run), "--resume",
                 "auto", "--workers", "0", "--max-steps", "4", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "written by an earlier ddmim and cannot be resumed" in err[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written over


def _as_written_by(source, target, fmt: int) -> None:
    """A copy of `source` as a ddmim of checkpoint format `fmt` with a config section this one lacks writes it."""
    from ddmim.checkpoints import FORMAT_KEY

    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    ckpt[FORMAT_KEY] = fmt
    ckpt["hyper_parameters"]["config"]["future"] = {"knob": 1}
    ckpt[DIGEST_KEY] = payload_digest(ckpt)
    torch.save(ckpt, target)


def test_a_newer_ddmims_checkpoint_is_refused_as_newer_and_never_set_aside(pretrain_ckpt, tmp_path, capsys):
    from ddmim.checkpoints import FORMAT
    from ddmim.train.checkpoint_files import resume_checkpoint

    assert torch.load(pretrain_ckpt, weights_only=False)["ddmim_format"] == FORMAT  # every checkpoint says its format
    newer, same = tmp_path / "newer.ckpt", tmp_path / "same.ckpt"
    _as_written_by(pretrain_ckpt, newer, FORMAT + 1)
    _as_written_by(pretrain_ckpt, same, FORMAT)  # the control: the same file, of this ddmim's format
    assert main(["export", "--ckpt", str(newer), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert f"was written by a newer ddmim (checkpoint format {FORMAT + 1}" in err and "upgrade ddmim" in err
    assert main(["export", "--ckpt", str(same), "--out", str(tmp_path / "e2")]) == 2
    assert "unknown option future" in capsys.readouterr().err

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "step00000001.ckpt").write_bytes(pretrain_ckpt.read_bytes())
    newest = folder / "step00000009.ckpt"
    _as_written_by(pretrain_ckpt, newest, FORMAT + 1)
    ckpt = torch.load(newest, weights_only=False)
    ckpt["global_step"] = 9
    ckpt[DIGEST_KEY] = payload_digest(ckpt)
    torch.save(ckpt, newest)
    with pytest.raises(UserError, match="newer ddmim"):
        resume_checkpoint(folder)
    assert newest.is_file()  # not renamed *.unreadable, and the older one was not chosen in its place
