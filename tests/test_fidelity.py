"""The `seed` preset computes what the original DDMIM computes; `simmim` is SimMIM."""
import pytest
import torch
import torch.nn.functional as F

from ddmim.config import make_config, preset_names
from ddmim.models.factory import pretraining_model
from ddmim.models.losses import reconstruction_loss


def _images(cfg, n=2, seed=0):
    return torch.randn(n, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(seed))


def original_layer_outputs(stages, tokens, masks):
    """The original's Swin layer order, composed from the same timm modules: stage i's blocks on the (masked)
    tokens, then stage i+1's patch merging."""
    outs, x = [], tokens
    for i, stage in enumerate(stages):
        if masks[i] is not None:
            x = x * masks[i].unsqueeze(-1)
        for block in stage.blocks:
            x = block(x)
        if i + 1 < len(stages):
            x = stages[i + 1].downsample(x)
        outs.append(x)
    return outs


def _seed_shaped_small():
    """The seed's settings (tap, masks, losses) on the tiny backbone, so the reference runs in a second."""
    return make_config("tiny", ["model.drop_path_rate=0.1"])


def test_perceptual_terms_read_where_the_original_reads():
    torch.manual_seed(0)
    cfg = _seed_shaped_small()
    model = pretraining_model(cfg).eval()  # drop path off: both sides deterministic
    with torch.no_grad():  # a teacher away from the student, as after some training
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = _images(cfg)
    base, masks = model.draw_masks(2, seed=1)
    out = model(images, base, masks)
    tokens = model.student.net.patch_embed(images)
    student = original_layer_outputs(model.student.stages, tokens, masks)
    with torch.no_grad():
        teacher = original_layer_outputs(model.teacher, tokens, [None] * 4)
    for i in range(4):
        reference = F.smooth_l1_loss(student[i], teacher[i])
        assert torch.allclose(out[f"perceptual_{i}"], reference, atol=1e-6, rtol=0), i
    # the grids of the taps: stage i's output after stage i+1's merging
    assert [tuple(s.shape[1:]) for s in student] == [(8, 8, 64), (4, 4, 128), (2, 2, 256), (2, 2, 256)]

    model.zero_grad()
    sum(out[f"perceptual_{i}"] for i in range(4)).backward()
    for i in (1, 2, 3):
        merging = [p.grad for p in model.student.stages[i].downsample.parameters()]
        assert merging and all(g is not None and g.abs().sum() > 0 for g in merging), i

    other = pretraining_model(make_config("tiny", ["model.perceptual_tap=stage_output"])).eval()
    other.load_state_dict(model.state_dict())
    assert not torch.allclose(other(images, base, masks)["perceptual_0"], out["perceptual_0"])


@pytest.mark.parametrize("mode, differ", [("train", True), ("eval", False)])
def test_the_seed_teacher_runs_with_drop_path_unless_told_otherwise(mode, differ):
    torch.manual_seed(0)
    cfg = make_config("seed", [f"ema.teacher_mode={mode}"])
    model = pretraining_model(cfg).train()  # what Lightning does before every training epoch
    with torch.no_grad():  # Swin V2 starts its residual branches at zero, where drop path changes nothing
        for p in model.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = _images(cfg, n=1)
    with torch.no_grad():
        first, second = (model.forward_teacher(images)[-1] for _ in range(2))
    assert (not torch.equal(first, second)) == differ


def test_the_first_ema_update_copies_and_the_counter_restarts_each_epoch():
    from ddmim.train.pretrain_module import DDMIMModule

    module = DDMIMModule(make_config("tiny", ["ema.every=3", "ema.decay=0.5"]).to_dict())
    student, teacher = module.model.student.stages, module.model.teacher
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    module.ema_step(epoch_step=0)  # the first update: a plain copy
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))
    before = [t.clone() for t in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    module.ema_step(epoch_step=1)  # not a multiple of every: no update
    assert all(torch.equal(t, b) for t, b in zip(teacher.parameters(), before))
    module.ema_step(epoch_step=0)  # batch 0 of the next epoch: an EMA step
    assert all(torch.allclose(t, b + 0.5) for t, b in zip(teacher.parameters(), before))


def test_simmim_has_a_learned_mask_token_and_plain_l1_over_the_masked_pixels():
    torch.manual_seed(0)
    cfg = make_config("simmim", ["model.img_size=64", "model.window_size=2"])
    model = pretraining_model(cfg)
    images = _images(cfg)
    base, masks = model.draw_masks(2, seed=1)
    out = model(images, base, masks)
    out["loss"].backward()
    assert model.mask_token is not None and model.mask_token.grad.abs().sum() > 0

    pred = model.forward_decoder(model.forward_encoder(images, masks)[-1])
    hidden = 1 - base.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).expand_as(images)
    by_hand = ((pred - images).abs() * hidden).sum() / hidden.sum()
    assert torch.allclose(out["recon"], by_hand, rtol=1e-5)


def test_l1_reconstruction_on_a_hand_computed_case():
    pred = torch.zeros(1, 3, 4, 4)
    target = torch.arange(48, dtype=torch.float32).view(1, 3, 4, 4) / 10
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # the top-right 2 x 2 pixels are masked
    masked_values = [c * 1.6 + r * 0.4 + col * 0.1 for c in range(3) for r in (0, 1) for col in (2, 3)]
    expected = sum(masked_values) / 12
    got = reconstruction_loss(pred, target, mask, beta=0.0, normalize="masked")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_every_preset_scales_its_learning_rate_with_the_global_batch():
    from ddmim.finetune_config import make_finetune_config

    assert all(make_config(name).optim.lr_batch > 0 for name in preset_names("pretrain"))
    assert all(make_finetune_config(name).optim.lr_batch > 0 for name in preset_names("finetune"))
