"""Fine-tuning's RandAugment on batch tensors (FFCV, DALI): per-image draws, applied in groups, equal to the
same draws applied image by image, and with no call that would make the host wait for a GPU."""
import random
from collections import Counter

import torch

from benchmarks.check_step import DispatchSyncs, SyncCounter
from ddmim.data.batch_augment import BatchRandAugment

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_grouped_operations_equal_the_same_draws_image_by_image():
    augment = BatchRandAugment("rand-m9-mstd0.5-inc1", MEAN, STD)
    random.seed(0)
    pixels = torch.rand(24, 3, 32, 32)
    rounds = augment.draw(len(pixels), 32, 32)
    assert len({pick for picks in rounds for pick in picks}) > 8  # many groups, not one per round
    grouped = augment.transform(pixels, rounds)
    one_by_one = []
    for position, image in enumerate(pixels):
        image = image.unsqueeze(0)
        for picks in rounds:
            image = augment.apply(image, *picks[position])
        one_by_one.append(image)
    assert torch.allclose(grouped, torch.cat(one_by_one), atol=1e-6)


def test_every_operation_at_both_signs_equals_torchvisions_on_a_wide_image():
    """The operations done without torchvision's functions (the geometric ones in one grid sample, each image
    with its matrix; Sharpness; AutoContrast, also on a flat channel) against those functions, image by image."""
    augment = BatchRandAugment("rand-m9", MEAN, STD)
    pixels = torch.rand(len(augment.names) * 2, 3, 40, 56)
    pixels[0, 1] = 0.25  # a flat channel, which AutoContrast leaves as it is
    signed = {name: augment._magnitude(name, 40, 56) for name in augment.names}
    picks = [(name, sign * value if is_signed else value) for name, (value, is_signed) in signed.items()
             for sign in (1, -1)]
    batched = augment.transform(pixels, [picks])
    for position, (name, magnitude) in enumerate(picks):
        alone = augment.apply(pixels[position:position + 1], name, magnitude)
        assert torch.allclose(batched[position:position + 1], alone, atol=1e-6), (name, magnitude)
    assert not torch.equal(batched, pixels)


def test_each_image_draws_every_operation_and_both_signs():
    augment = BatchRandAugment("rand-m9-n2", MEAN, STD)
    random.seed(1)
    picks = [pick for picks in augment.draw(7000, 224, 224) for pick in picks]  # 14,000 draws
    names = Counter(name for name, _ in picks)
    assert set(names) == set(augment.names) and len(names) == 14
    assert all(abs(n / len(picks) - 1 / 14) < 0.02 for n in names.values()), names
    rotations = [m for name, m in picks if name == "Rotate"]
    assert {m > 0 for m in rotations} == {True, False}
    assert {abs(m) for m in rotations} == {augment._magnitude("Rotate", 224, 224)[0]}
    assert all(m == 0.0 for name, m in picks if name in ("Identity", "Equalize", "AutoContrast"))


def test_images_of_one_batch_are_augmented_differently_and_stay_normalised():
    augment = BatchRandAugment("rand-m9", MEAN, STD)
    random.seed(2)
    one = (torch.rand(1, 3, 48, 48) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = augment(one.repeat(16, 1, 1, 1).to(torch.bfloat16))
    assert out.shape == (16, 3, 48, 48) and out.dtype == torch.bfloat16
    distinct = {tuple(image.flatten()[:64].tolist()) for image in out}
    assert len(distinct) > 4
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = out.float().transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 0.05).all() and (per_channel.max(1).values <= high + 0.05).all()


def test_an_augmented_batch_makes_no_call_that_waits_for_the_device():
    augment = BatchRandAugment("rand-m9-mstd0.5-inc1", MEAN, STD)
    images = torch.randn(8, 3, 32, 32)
    augment(images)  # the first call caches the constants and magnitudes
    counter = SyncCounter()
    with counter.patched():
        counter.active = True
        augment(images)
        counter.active = False
        planted = SyncCounter()
    with planted.patched():
        planted.active = True
        augment(images).sum().item()  # the counter does see a sync when there is one
    assert dict(counter.calls) == {}
    assert planted.calls["Tensor.item"] == 1


def test_an_augmented_batch_builds_no_tensor_from_python_values_at_the_dispatcher():
    """A tensor built from Python values on a GPU is a blocking copy; torchvision's affine, rotate, sharpness
    and autocontrast build one at every call. The control: torchvision's own ShearX is seen."""
    augment = BatchRandAugment("rand-m9-mstd0.5-inc1", MEAN, STD)
    images = torch.randn(32, 3, 32, 32)
    augment(images)  # the first call caches the constants
    with DispatchSyncs() as dispatched:
        for seed in range(8):
            random.seed(seed)
            augment(images)
    with DispatchSyncs() as control:
        augment.apply(images, "ShearX", 0.3)
    assert dict(dispatched.calls) == {}
    assert control.calls["lift_fresh"] >= 1
