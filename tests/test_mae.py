"""MAE on timm's VisionTransformer, and every preset of the seed table's rows."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from ddmim.cli import main
from ddmim.config import make_config
from ddmim.models.factory import pretraining_model
from ddmim.models.mae import MAE, masked_patch_loss, normalise_patches, patchify


def _mae(norm_pix: bool = True) -> MAE:
    torch.manual_seed(0)
    return pretraining_model(make_config("tiny_mae", [f"loss.norm_pix={str(norm_pix).lower()}"]))


def test_the_encoder_sees_only_the_visible_quarter_plus_the_class_token():
    model = _mae()
    images = torch.randn(3, 3, 32, 32)
    base, _ = model.draw_masks(3, seed=1)
    lengths = []
    model.student.net.blocks[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    model(images, base)
    patches = model.student.grid ** 2
    assert lengths == [patches // 4 + 1]
    assert (base.flatten(1).sum(dim=1) == patches // 4).all()


def test_the_loss_ignores_the_visible_patches():
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    base, _ = model.draw_masks(2, seed=2)
    latent, ids = model.forward_encoder(images, base)
    pred = model.forward_decoder(latent, ids)
    loss = model.forward_loss(images, pred, base)["loss"]
    visible = base.flatten(1).bool()
    changed = pred.clone()
    changed[visible] += 10.0
    assert torch.equal(model.forward_loss(images, changed, base)["loss"], loss)
    changed = pred.clone()
    changed[~visible] += 10.0
    assert model.forward_loss(images, changed, base)["loss"] > loss


def test_norm_pix_targets_and_loss_on_a_hand_computed_case():
    target = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [4.0, 4.0, 4.0, 4.0]]])  # two patches of 4 values
    normed = normalise_patches(target)
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3  # unbiased variance, as MAE's
    expected = torch.tensor([(v - mean) / (var + 1e-6) ** 0.5 for v in (1.0, 2.0, 3.0, 6.0)])
    torch.testing.assert_close(normed[0, 0], expected)
    assert torch.equal(normed[0, 1], torch.zeros(4))  # a flat patch normalises to zeros
    pred = torch.zeros(1, 2, 4)
    visible = torch.tensor([[0.0, 1.0]])  # only the first patch is masked
    by_hand = (expected ** 2).mean()
    torch.testing.assert_close(masked_patch_loss(pred, normed, visible), by_hand)


def test_patchify_orders_patches_row_by_row():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 12)
    assert patches[0, 1, :3].tolist() == [images[0, c, 0, 2].item() for c in range(3)]  # top-right patch, (0, 0)


ROWS = [  # (pretraining preset or None, fine-tuning preset, extra overrides for a CPU-sized check)
    ("seed", "seed_400", []),
    ("simmim", "mim", []),
    ("mae_vit_s16", "mae_vit_s16", []),
    ("mae_vit_b16", "mae_vit_s16", []),
    (None, "supervised_swin_t", ["model.img_size=64"]),
    ("tiny_simmim", "tiny", []),
    ("tiny_mae", "tiny_linear", []),
]


# B/16's width and heads in 2 of its 12 blocks: the row checks that the preset composes, trains, exports and
# fine-tunes (the full depth took 52 s of the suite, mostly writing 1 GB checkpoints)
SHALLOWER = {"mae_vit_b16": ["--set", "model.depths=[2]"]}


@pytest.fixture(scope="module")
def few_digits(sample_root, tmp_path_factory):
    """Three classes of the sample set, 4 train and 2 val images each: the checks below are about wiring."""
    import shutil

    root = tmp_path_factory.mktemp("few")
    for split, count in (("train", 4), ("val", 2)):
        for label in ("0", "1", "2"):
            (root / split / label).mkdir(parents=True)
            for path in sorted((sample_root / split / label).iterdir())[:count]:
                shutil.copy(path, root / split / label / path.name)
    return root


@pytest.mark.parametrize("pretrain, finetune, extra", ROWS, ids=[f"{p}-{f}" for p, f, _ in ROWS])
def test_each_row_pretrains_fine_tunes_and_exports(pretrain, finetune, extra, few_digits, tmp_path):
    sample_root = few_digits
    small = ["--batch-size", "2", "--workers", "0", "--max-steps", "2", "--epochs", "1", "--no-progress"]
    ckpt = []
    if pretrain:
        size = [] if pretrain.startswith("tiny") else ["--set", "model.img_size=64", *SHALLOWER.get(pretrain, [])]
        assert main(["train", "--data", str(sample_root), "--preset", pretrain, "--out", str(tmp_path / "pre"),
                     *small, *size]) == 0
        ckpt = ["--ckpt", str(tmp_path / "pre" / "checkpoints" / "last.ckpt")]
        assert main(["export", *ckpt, "--out", str(tmp_path / "export")]) == 0
        recipe = json.loads((tmp_path / "export" / "timm.json").read_text())
        net = timm.create_model(recipe["model_name"], **recipe["kwargs"])
        net.load_state_dict(load_file(tmp_path / "export" / "backbone.safetensors"), strict=True)
    extra_sets = [a for item in extra for a in ("--set", item)]
    assert main(["finetune", "--data", str(sample_root), "--preset", finetune, "--out", str(tmp_path / "ft"),
                 *ckpt, *small, *extra_sets]) == 0
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["steps"] == 2 and (summary["encoder_tensors_loaded"] > 0) == bool(pretrain)
