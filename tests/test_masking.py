import pytest
import torch

from ddmim.config import make_config
from ddmim.models.factory import pretraining_model
from ddmim.models.masking import base_token_mask, pixel_mask, stage_masks


@pytest.mark.parametrize("ratio", [0.5, 0.3, 0.75])
def test_base_mask_ratio_and_values(ratio):
    g = torch.Generator().manual_seed(1)
    mask = base_token_mask(64, 56, ratio, generator=g)
    assert mask.shape == (64, 56, 56)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    n = mask.numel()
    sigma = (ratio * (1 - ratio) / n) ** 0.5
    assert abs((1 - mask.mean().item()) - ratio) < 5 * sigma
    # tokens are masked independently: no per-image ratio is forced
    assert (1 - mask.mean(dim=(1, 2))).std() > 0


def test_stage_masks_are_strided_downsample():
    base = base_token_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(2))
    masks = stage_masks(base, [0.5, 0.5, 0.5, 0.0])
    assert masks[3] is None
    for i in range(3):
        s = 2**i
        blocks = base.reshape(3, 16 // s, s, 16 // s, s)
        assert torch.equal(masks[i], blocks[:, :, 0, :, 0])  # top-left token of each block
    # strided sampling is not pooling: some 2x2 block with a masked token keeps a visible top-left value
    assert (masks[1] > base.reshape(3, 8, 2, 8, 2).amin(dim=(2, 4))).any()


def test_pixel_mask_upsamples_nearest():
    base = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pm = pixel_mask(base, 4)
    assert pm.shape == (1, 1, 8, 8)
    assert torch.equal(pm[0, 0, :4, :4], torch.ones(4, 4))
    assert torch.equal(pm[0, 0, :4, 4:], torch.zeros(4, 4))
    assert torch.equal(pm[0, 0, 4:, 4:], torch.ones(4, 4))


def test_masked_stage_input_tokens_are_exactly_zero():
    cfg = make_config("tiny")
    model = pretraining_model(cfg).eval()
    # Swin V2 zero-initialises its residual post-norms, so at init masked tokens would stay zero through
    # the blocks on their own; unit norms make the blocks mix tokens as a trained model does
    for module in model.student.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
    seen = {}
    for i, stage in enumerate(model.student.stages):
        stage.blocks[0].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
    images = torch.randn(4, 3, 32, 32)
    base = model.draw_masks(4, seed=3)[0]
    model(images, base)
    masks = stage_masks(base, cfg.mask.ratios)
    for i in range(3):
        tokens, mask = seen[i], masks[i]
        assert tokens.shape[:3] == mask.shape
        assert torch.all(tokens[mask == 0] == 0)
        assert torch.all(tokens[mask == 1].abs().sum(-1) > 0)
    assert torch.all(seen[3].abs().sum(-1) > 0)  # the last stage is not masked
