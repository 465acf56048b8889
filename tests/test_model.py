import copy

import pytest
import torch

from ddmim.config import make_config
from ddmim.models.ema import ema_update_
from ddmim.models.factory import pretraining_model


def _batch(cfg, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, cfg.model.img_size, cfg.model.img_size, generator=g)


def test_seed_preset_shapes_and_parameter_count():
    cfg = make_config("seed")
    model = pretraining_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 28_000_000 <= trainable <= 32_000_000
    with torch.no_grad():
        outs = model.student.forward_features(torch.randn(1, 3, 224, 224))
        pred = model.forward_decoder(outs[-1])
    # the original's taps: stages 0-2 read after the next stage's patch merging
    assert [tuple(o.shape[1:3]) for o in outs] == [(28, 28), (14, 14), (7, 7), (7, 7)]
    assert [o.shape[-1] for o in outs] == [192, 384, 768, 768]
    assert pred.shape == (1, 3, 224, 224)
    assert model.student.forward_head(outs[-1]).shape == (1, 1024)


def test_teacher_starts_as_copy_and_gets_no_gradients(tiny_cfg):
    model = pretraining_model(tiny_cfg)
    for t, s in zip(model.teacher.parameters(), model.student.stages.parameters()):
        assert torch.equal(t, s)
    images = _batch(tiny_cfg)
    out = model(images, model.draw_masks(4)[0])
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())


def test_every_student_parameter_receives_gradients(tiny_cfg):
    model = pretraining_model(tiny_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = _batch(tiny_cfg)
    # Swin V2 zero-initialises its residual post-norms, which blocks gradients to attention and MLP
    # weights until one step has moved them; the second step's gradients must reach everything.
    for _ in range(2):
        opt.zero_grad()
        model(images, model.draw_masks(4)[0])["loss"].backward()
        opt.step()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_ema_update_matches_formula(tiny_cfg):
    model = pretraining_model(tiny_cfg)
    with torch.no_grad():
        for p in model.student.stages.parameters():
            p.add_(torch.randn_like(p))
    before = copy.deepcopy(model.teacher)
    decay = 0.999
    ema_update_(model.teacher, model.student.stages, decay)
    for t_new, t_old, s in zip(model.teacher.parameters(), before.parameters(), model.student.stages.parameters()):
        expected = t_old * decay + (1 - decay) * s
        torch.testing.assert_close(t_new, expected, rtol=0, atol=1e-7)
        assert not torch.equal(t_new, t_old)
    for t_buf, s_buf in zip(model.teacher.buffers(), model.student.stages.buffers()):
        assert torch.equal(t_buf, s_buf)


@pytest.mark.parametrize("decay, skipped", [(0.999, 0.0), (0.999, 1.0), (0.0, 0.0)])
def test_the_device_flagged_ema_update_follows_the_formula_without_a_sync(tiny_cfg, decay, skipped):
    from benchmarks.check_step import DispatchSyncs

    model = pretraining_model(tiny_cfg)
    with torch.no_grad():
        for p in model.student.stages.parameters():
            p.add_(torch.randn_like(p))
        for b in model.teacher.buffers():
            b.fill_(0)  # so that the copy of the student's shows
    before = copy.deepcopy(model.teacher)
    flag = torch.tensor(skipped)
    with DispatchSyncs() as syncs:
        ema_update_(model.teacher, model.student.stages, decay, skip=flag)
    assert dict(syncs.calls) == {}  # _foreach_lerp_ with this flag read it on the host
    for t_new, t_old, s in zip(model.teacher.parameters(), before.parameters(), model.student.stages.parameters()):
        if skipped:
            assert torch.equal(t_new, t_old)
        elif decay == 0.0:
            assert torch.equal(t_new, s)  # the first update is an exact copy
        else:
            torch.testing.assert_close(t_new, t_old * decay + (1 - decay) * s, rtol=0, atol=1e-7)
    assert all(torch.equal(t, s) for t, s in zip(model.teacher.buffers(), model.student.stages.buffers()))


def test_loss_combines_terms_with_stagefactor_and_alpha(tiny_cfg):
    tiny_cfg.ddmim.contrastive_weight = 0.5
    tiny_cfg.ddmim.perceptual_weights = [1.0, 0.5, 0.25, 0.1]
    model = pretraining_model(tiny_cfg)
    out = model(_batch(tiny_cfg), model.draw_masks(4)[0])
    expected = out["recon"] + 0.5 * out["contrastive"] + sum(
        f * out[f"perceptual_{i}"] for i, f in enumerate(tiny_cfg.ddmim.perceptual_weights))
    torch.testing.assert_close(out["loss"], expected)


def test_channels_last_gives_the_same_loss(tiny_cfg):
    model = pretraining_model(tiny_cfg).eval()
    images, mask = _batch(tiny_cfg), model.draw_masks(4)[0]
    reference = model(images, mask)["loss"]
    assert model.reconstruct(images, mask).is_contiguous()  # no layout copy before the loss
    model.to_channels_last()
    cl_images = images.contiguous(memory_format=torch.channels_last)
    fast = model(cl_images, mask)["loss"]
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    recon = model.reconstruct(cl_images, mask)
    assert recon.is_contiguous(memory_format=torch.channels_last) and not recon.is_contiguous()


def test_simmim_has_no_teacher_or_projection_and_every_trained_weight_gets_a_gradient():
    model = pretraining_model(make_config("tiny_simmim"))
    assert model.teacher is None and model.proj is None and not model.uses_teacher
    base, masks = model.draw_masks(2)
    model(torch.randn(2, 3, 32, 32), base, masks)["loss"].backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.grad is not None for p in trained.values())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("student.net.head.") for n in frozen)  # the pooled head nothing reads
