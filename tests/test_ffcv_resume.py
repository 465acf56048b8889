"""FFCV training batches depend on the run's seed alone (not on threads or the OS), so a resumed run repeats
them: the crop and flip of each visit are seeded, and a resumed epoch starts at the batch it stopped at."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import decode_index
from ddmim.config import make_config
from ddmim.data.ffcv_loader import make_loader
from ddmim.data.loader_spec import LoaderSpec

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # each FFCV loader compiles its pipeline (about 10 s here)


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """A .beton of 24 left-to-right gradients (40 x 32, so a flip is visible), whatever their crop."""
    from data_prep import to_ffcv

    src = tmp_path_factory.mktemp("gradients")
    ramp = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 32, axis=0)
    for split, count in (("train", 12), ("val", 2)):
        for name in ("a", "b"):
            (src / split / name).mkdir(parents=True)
            for k in range(count):
                Image.fromarray(np.concatenate([ramp, ramp[:, ::-1] // (k + 2), ramp // 2], axis=2)).save(
                    src / split / name / f"{k}.png")
    out = tmp_path_factory.mktemp("gradients-ffcv")
    assert to_ffcv.main([str(src), str(out), "--workers", "1"]) == 0
    return out / "train.beton"


def batches(path, *overrides, epochs=2, global_step=0, accumulate=1):
    """The loader's training batches, whose building and epochs leave torch's thread count as it was (FFCV sets
    it to its worker count: with data.num_workers 1 and 2 one of them differs from the caller's)."""
    threads = torch.get_num_threads()
    cfg = make_config("tiny", ["train.batch_size=4", *overrides])
    loader = make_loader(path, LoaderSpec.of(cfg), train=True, device=CPU, global_step=global_step,
                         accumulate=accumulate)
    assert torch.get_num_threads() == threads
    out = [x.clone() for _ in range(epochs) for x, _ in loader]  # FFCV reuses its batch buffers
    assert torch.get_num_threads() == threads, (threads, torch.get_num_threads(), overrides)
    return out


def test_crops_and_flips_follow_the_seed_not_the_threads(gradients):
    one, two = batches(gradients, "data.num_workers=1"), batches(gradients, "data.num_workers=2")
    assert len(one) == 12 and all(torch.equal(a, b) for a, b in zip(one, two))
    other = batches(gradients, "data.num_workers=2", "train.seed=1")
    assert not any(torch.equal(a, b) for a, b in zip(one, other))
    assert not torch.equal(one[0], one[6])  # the second epoch draws anew


def test_a_flip_mirrors_the_crop_it_was_drawn_with(gradients):
    whole = ["data.crop_scale=[1.0,1.0]", "data.crop_ratio=[1.25,1.25]"]  # the whole 40 x 32 image
    plain = batches(gradients, *whole, "data.hflip=0.0", epochs=1)
    flipped = batches(gradients, *whole, "data.hflip=1.0", epochs=1)
    assert all(torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped))
    half = batches(gradients, *whole, "data.hflip=0.5", epochs=1)
    mirrored = [torch.equal(a.flip(-1), b) for p, h in zip(plain, half) for a, b in zip(p, h)]
    assert 0 < sum(mirrored) < len(mirrored)


def test_a_resumed_loader_goes_on_at_the_batch_after_the_step(converted):
    path = converted["ffcv"] / "train.beton"
    whole = batches(path, epochs=3)
    per_epoch = len(whole) // 3
    for step in (3, per_epoch + 5):
        rest = batches(path, global_step=step, epochs=3 - step // per_epoch)
        assert len(rest) == len(whole) - step and all(torch.equal(a, b) for a, b in zip(rest, whole[step:]))
    # 5 micro-batches a step: 48 images in 5 slots of 10 (2 whole batches each), 2 steps an epoch; step 3 is 5
    # micro-batches into epoch 1
    dealt = batches(path, epochs=3, accumulate=5)
    rest = batches(path, global_step=3, epochs=2, accumulate=5)
    assert len(dealt) == 30 and len(rest) == len(dealt) - 15
    assert all(torch.equal(a, b) for a, b in zip(rest, dealt[15:]))
    cfg = make_config("tiny")
    seen = [i for x in whole[:per_epoch] for i in decode_index(x, cfg.data.mean, cfg.data.std)]
    assert len(seen) == len(set(seen))  # an epoch reads each sample once


def test_a_step_reads_the_same_samples_on_one_process_accumulating_as_on_two(converted):
    """FFCV deals the epoch as the folder loader does (`DealtOrder`): the images of each optimiser step are the
    same on 1 process x 2 micro-batches of 4 as on 2 processes x 1 and on 1 process x 1 batch of 8 (FFCV's own
    permutation, which one process without accumulation used, was another order), so a run resumes on any of them
    at one global batch."""
    from unittest import mock

    cfg = make_config("tiny", ["train.batch_size=4"])
    path = converted["ffcv"] / "train.beton"
    one = make_loader(path, LoaderSpec.of(cfg), train=True, device=CPU, accumulate=2)
    read = [i for x, _ in one for i in decode_index(x, cfg.data.mean, cfg.data.std)]
    orders = []
    for rank in (0, 1):
        with mock.patch("torch.distributed.is_available", return_value=True), \
                mock.patch("torch.distributed.get_world_size", return_value=2), \
                mock.patch("torch.distributed.get_rank", return_value=rank):
            two = make_loader(path, LoaderSpec.of(cfg), train=True, device=CPU, world=2, rank=rank)
        assert len(two) == len(one) // 2
        orders.append(two.loader.traversal_order.sample_order(0).tolist())
    wide = make_loader(path, LoaderSpec.of(make_config("tiny", ["train.batch_size=8"])), train=True, device=CPU)
    wide_read = [i for x, _ in wide for i in decode_index(x, cfg.data.mean, cfg.data.std)]
    assert len(read) == len(set(read)) == 2 * len(orders[0]) == len(wide_read) and len(one) % 2 == 0
    per_step = 2 * 4
    for step in range(len(one) // 2):
        both = orders[0][step * 4:(step + 1) * 4] + orders[1][step * 4:(step + 1) * 4]
        assert sorted(read[step * per_step:(step + 1) * per_step]) == sorted(both), step
        assert sorted(wide_read[step * per_step:(step + 1) * per_step]) == sorted(both), step
