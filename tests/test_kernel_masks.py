"""The fused mask kernel: strided stage masks bit-exact, ratio, exact counts, reproducibility."""
import pytest
import torch

from ddmim.models.masking import base_token_mask
from ddmim_kernels.mask_gen import fused_masks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def poisoned(batch, grid, stages):
    return [torch.full((batch, grid // 2**i, grid // 2**i), float("nan"), device=DEVICE) for i in range(stages)]


# the exact-count kernel sorts a whole image in one program: in the interpreter that is slow for 56 x 56
@pytest.mark.parametrize("grid, ratios, exact_count", [
    (56, [0.5, 0.5, 0.5, 0.0], False),
    (24, [0.5, 0.5, 0.5, 0.0], True),
    (16, [0.3, 0.3, 0.3, 0.3], False),
    (16, [0.3, 0.3, 0.3, 0.3], True),
    (12, [0.6, 0.6, 0.6], False),
    (12, [0.6, 0.0, 0.6], True),
    (8, [0.5], False),
    (8, [0.5], True),
])
def test_stage_masks_are_bit_exact_downsamples_of_the_base(grid, ratios, exact_count):
    written = max(i for i, r in enumerate(ratios) if r > 0) + 1
    out = poisoned(3, grid, written)
    base, stages = fused_masks(3, grid, ratios, seed=5, offset=0, device=DEVICE, exact_count=exact_count, out=out)
    assert base.data_ptr() == out[0].data_ptr()
    assert set(base.unique().tolist()) <= {0.0, 1.0}
    for i, (ratio, stage) in enumerate(zip(ratios, stages)):
        if ratio == 0:
            assert stage is None
        else:
            assert torch.equal(stage, base[:, :: 2**i, :: 2**i])


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_masked_fraction_matches_ratio(ratio):
    base, _ = fused_masks(16, 56, [ratio, 0, 0, 0], seed=1, offset=0, device=DEVICE)
    n = base.numel()
    assert abs((1 - base.mean().item()) - ratio) < 5 * (ratio * (1 - ratio) / n) ** 0.5
    per_image = 1 - base.mean(dim=(1, 2))
    assert per_image.std() > 0  # independent draws: counts vary from image to image


@pytest.mark.parametrize("grid, ratio", [(8, 0.5), (12, 0.6), (8, 0.0), (16, 0.75)])
def test_exact_count_masks_exactly_that_many_tokens_per_image(grid, ratio):
    base, _ = fused_masks(4, grid, [ratio], seed=2, offset=0, device=DEVICE, exact_count=True)
    masked = (base == 0).flatten(1).sum(1)
    assert masked.tolist() == [round(ratio * grid * grid)] * 4
    # and the choice differs between images
    if 0 < ratio:
        assert not torch.equal(base[0], base[1])


def test_reference_exact_count():
    base = base_token_mask(5, 16, 0.6, exact_count=True, generator=torch.Generator().manual_seed(0))
    assert (base == 0).flatten(1).sum(1).tolist() == [round(0.6 * 256)] * 5


def test_same_seed_same_mask_and_different_offsets_or_seeds_differ():
    def draw(seed, offset):
        return fused_masks(4, 16, [0.5, 0.5], seed=seed, offset=offset, device=DEVICE)[0]

    assert torch.equal(draw(7, 0), draw(7, 0))
    assert not torch.equal(draw(7, 0), draw(7, 4 * 16 * 16))
    assert not torch.equal(draw(7, 0), draw(8, 0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(grid=10, ratios=[0.5, 0.5, 0.5]), "not divisible"),
    (dict(grid=8, ratios=[1.0]), r"ratios\[0\] must be in"),
    (dict(grid=32, ratios=[0.5] * 5), "1 to 4 entries"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused_masks(2, seed=0, offset=0, device=DEVICE, **kwargs)
