"""A new backbone and a new method plug in through the public registry functions alone, and train end to end."""
import pytest
import torch
from torch import nn

from conftest import QUIET_STEPS
from ddmim.config import make_config
from ddmim.errors import UserError
from ddmim.models import factory
from ddmim.models.contracts import PlainNet, PretrainingMethod, StageBackbone, VisibleBackbone
from ddmim.models.losses import reconstruction_loss
from ddmim.models.masking import pixel_mask


class ConvPatches(nn.Module):
    """A toy backbone: one strided convolution, patch tokens as a feature map."""

    timm_name = "toy_conv"

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int):  # only its own model.* keys
        super().__init__()
        self.net = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.timm_kwargs = {"patch_size": patch_size, "embed_dim": embed_dim}
        self.grid, self.patch_size, self.embed_dim = img_size // patch_size, patch_size, embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class MaskedConvAutoencoder(nn.Module):
    """A toy method: zero the masked patches, encode, predict every pixel with a 1x1 convolution."""

    uses_teacher = False

    def __init__(self, encoder: nn.Module, *, ratio: float):
        super().__init__()
        self.student, self.ratio = encoder, ratio
        self.decoder = nn.Sequential(nn.Conv2d(encoder.embed_dim, 3 * encoder.patch_size ** 2, 1),
                                     nn.PixelShuffle(encoder.patch_size))

    def draw_masks(self, batch, *, device=None, seed=0, index=0):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        base = (torch.rand(batch, self.student.grid, self.student.grid, generator=generator) >= self.ratio).float()
        return base.to(device), [base.to(device)]

    def reconstruct(self, images, base_mask):
        return self.decoder(self.student(images * pixel_mask(base_mask, self.student.patch_size)))

    def forward(self, images, base_mask, masks=None, gather=None):
        loss = reconstruction_loss(self.reconstruct(images, base_mask), images, base_mask, normalize="masked")
        return {"loss": loss, "recon": loss}

    def reconstruction_losses(self, images, base_mask):
        zeros = torch.zeros_like(images)
        return (self.forward(images, base_mask)["loss"],
                reconstruction_loss(zeros, images, base_mask, normalize="masked"))

    def update_teacher(self, decay, skip=None):
        pass

    def to_channels_last(self):
        self.to(memory_format=torch.channels_last)


def _build_toy(cfg, encoder, kernels):
    return MaskedConvAutoencoder(encoder, ratio=cfg.mask.ratios[0])


def _check_toy(cfg):
    if cfg.mask.ratios[0] == 0:
        raise UserError("model.method toy needs a masked share above 0")


@pytest.fixture
def registered(monkeypatch):
    """The two toys registered for one test; the tables are restored afterwards."""
    monkeypatch.setattr(factory, "BACKBONES", dict(factory.BACKBONES))
    monkeypatch.setattr(factory, "METHODS", dict(factory.METHODS))
    factory.register_backbone("toy_conv", ConvPatches)
    factory.register_method("toy", _build_toy, _check_toy)


def test_a_registered_method_and_backbone_pretrain_end_to_end(registered, sample_root, tmp_path):
    from ddmim.train.pretrain import pretrain

    cfg = make_config("tiny", ["model.method=toy", "model.backbone=toy_conv", "data.num_workers=0",
                               "train.epochs=1"])
    model = factory.pretraining_model(cfg)
    assert isinstance(model, PretrainingMethod) and isinstance(model.student, PlainNet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = pretrain(cfg, sample_root, tmp_path / "run", QUIET_STEPS(2))
    assert summary["steps"] == 2 and summary["val_loss_last"] is not None
    state = torch.load(summary["checkpoint_last"], weights_only=False)["state_dict"]
    assert {f"model.{k}" for k in before} == set(state)
    assert any(not torch.equal(state[f"model.{k}"], v) for k, v in before.items())  # it trained


def test_a_method_refuses_a_config_through_its_own_check(registered):
    cfg = make_config("tiny", ["model.method=toy", "model.backbone=toy_conv", "mask.ratios=[0.0,0.0,0.0,0.0]"])
    with pytest.raises(UserError, match="model.method toy needs a masked share"):
        factory.check_pretraining(cfg)


def test_a_backbone_receives_only_the_keys_its_signature_names(registered):
    kwargs = factory.backbone_kwargs(make_config("tiny", ["model.backbone=toy_conv"]).model)
    assert set(kwargs) == {"img_size", "patch_size", "embed_dim"}


def test_unknown_method_is_refused_with_the_registered_ones(registered):
    with pytest.raises(UserError, match="unknown method 'ibot'; available: ddmim, mae, toy"):
        factory.check_pretraining(make_config("tiny", ["model.method=ibot"]))


@pytest.mark.parametrize("preset", ["tiny", "tiny_simmim", "tiny_mae"])
def test_the_shipped_backbones_and_methods_satisfy_their_contracts(preset):
    model = factory.pretraining_model(make_config(preset))
    assert isinstance(model, PretrainingMethod)
    kind = VisibleBackbone if preset == "tiny_mae" else StageBackbone
    assert isinstance(model.student, kind)


def test_every_command_that_builds_a_model_runs_the_method_checks(capsys, sample_root, tmp_path):
    from ddmim.cli import main

    code = main(["train", "--data", str(sample_root), "--preset", "tiny", "--benchmark", "1", "--set",
                 "model.method=mae", "--workers", "0", "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ddmim: error: model.method mae needs a backbone") and "\n" not in err
