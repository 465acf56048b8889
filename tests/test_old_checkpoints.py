"""Checkpoints written before the teacher-free SimMIM: read for pictures and export, refused for resuming in
one line. The old layout is made from a new checkpoint by adding what the old SimMIM also saved: a teacher,
a projection head, and their tensors in the optimiser state."""

import torch

from conftest import QUIET_STEPS
from ddmim.checkpoints import DIGEST_KEY, payload_digest
from ddmim.cli import main
from ddmim.config import make_config


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
