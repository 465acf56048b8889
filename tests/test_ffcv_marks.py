"""FFCV's failed samples are found and replaced on the batch's device: the same result as the host-side rule
(each failed position takes the next good sample of the batch), named and counted on the steps that read the
count, and no call that would make the host wait for a GPU on any batch after the first."""
from pathlib import Path

import pytest
import torch

from benchmarks.check_step import SyncCounter
from ddmim.config import make_config
from ddmim.data.bad_samples import SkippedSamples, fill_from_others
from ddmim.data.ffcv_decoders import MARK, MarkReader
from ddmim.data.ffcv_loader import CheckedBatches
from ddmim.data.loader_spec import LoaderSpec

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def batch(size: int, failed: dict[int, int], height: int = 8) -> torch.Tensor:
    """uint8-valued pixels of `size` images, those at `failed` {position: sample index} drawn as the decoder's
    marker (top half MARK, bottom half the index in base 256)."""
    pixels = torch.randint(0, 256, (size, 3, height, height)).float()
    for position, index in failed.items():
        pixels[position, :, :height // 2] = torch.tensor(MARK, dtype=torch.float32).view(3, 1, 1)
        digits = torch.tensor([index % 256, index // 256 % 256, index // 65536], dtype=torch.float32)
        pixels[position, :, height // 2:] = digits.view(3, 1, 1)
    return normalised(pixels)


def host_rule(images, labels, failed: list[int], spare):
    """The reference: each failed position, in order, takes the next good one (cycling); none good: the spare."""
    good = [i for i in range(len(images)) if i not in failed]
    images, labels = images.clone(), labels.clone()
    for k, position in enumerate(failed):
        source = (images[good[k % len(good)]], labels[good[k % len(good)]]) if good else spare
        images[position], labels[position] = source
    return images, labels


def test_the_marks_are_read_on_the_device():
    images = batch(6, {1: 70_000, 4: 3})
    failed, indices = MarkReader(MEAN, STD)(images)
    assert failed.tolist() == [False, True, False, False, True, False]
    assert indices[1] == 70_000 and indices[4] == 3


@pytest.mark.parametrize("failed", [[], [2], [0, 1, 5], [0, 1, 2, 3, 4, 6], list(range(7))])
def test_filling_on_the_device_equals_the_host_rule(failed):
    images = torch.randn(7, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(7) * 10
    spare = (torch.full((1, 3, 8, 8), 5.0).contiguous(memory_format=torch.channels_last)[0], torch.tensor(99))
    flags = torch.tensor([i in failed for i in range(7)])
    out, out_labels, new_spare = fill_from_others(images, labels, flags, spare)
    expected, expected_labels = host_rule(images, labels, failed, spare)
    assert torch.equal(out, expected) and torch.equal(out_labels, expected_labels)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not any(torch.equal(out[i], images[j]) for i in range(7) for j in failed if len(failed) < 7)
    assert torch.equal(new_spare[0], spare[0] if len(failed) in (0, 7) else out[0])


def test_a_host_batch_without_failures_is_passed_on_without_a_copy():
    """Two copies of every batch cost FFCV 2.4x of its speed on the CPU, where reading the flags is free."""
    images, labels = torch.randn(4, 3, 8, 8), torch.arange(4)
    spare = (torch.zeros(3, 8, 8), torch.tensor(9))
    out, out_labels, new_spare = fill_from_others(images, labels, torch.zeros(4, dtype=torch.bool), spare)
    assert out.data_ptr() == images.data_ptr() and out_labels.data_ptr() == labels.data_ptr()
    assert new_spare is spare
    out, _, _ = fill_from_others(images, labels, torch.tensor([False, True, False, False]), spare)
    assert out.data_ptr() != images.data_ptr() and torch.equal(out[1], images[0])


class Batches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_failures_are_named_once_and_counted_when_the_count_is_read(capfd):
    labels = torch.arange(4)
    batches = [(batch(4, {}), labels), (batch(4, {2: 11}), labels), (batch(4, {0: 11, 3: 12}), labels),
               (batch(4, {0: 13, 1: 14, 2: 15, 3: 16}), labels), (batch(4, {}), labels)]
    skipped = SkippedSamples(20)
    checked = CheckedBatches(Batches(batches), Path("train.beton"), make_config("tiny"), skipped)
    out = list(checked)
    assert capfd.readouterr().err == ""  # nothing is read from the device while batches flow
    assert skipped.count == 6 and skipped.failed() == [11, 12, 13, 14, 15, 16]
    err = capfd.readouterr().err
    assert err.count("train.beton sample 11 ") == 1 and "train.beton sample 16 " in err
    assert len(out) == 5  # a batch with no good sample is filled from an earlier batch's, not dropped
    reader = MarkReader(MEAN, STD)
    assert not any(reader(images)[0].any() for images, _ in out)


def test_only_the_first_batch_is_looked_at_on_the_host(monkeypatch):
    monkeypatch.setattr("ddmim.data.bad_samples.on_host", lambda tensor: False)  # the batches as if on a GPU
    labels = torch.arange(4)
    batches = [(batch(4, {1: 5} if i % 2 else {}), labels) for i in range(6)]
    checked = CheckedBatches(Batches(batches), Path("train.beton"), make_config("tiny"), SkippedSamples(8))
    stream = iter(checked)
    next(stream)
    counter = SyncCounter()
    with counter.patched():
        counter.active = True
        rest = list(stream)
        counter.active = False
    assert len(rest) == 5 and dict(counter.calls) == {}


def test_batches_after_the_first_neither_read_nor_build_host_data_at_the_dispatcher(monkeypatch):
    from benchmarks.check_step import DispatchSyncs

    monkeypatch.setattr("ddmim.data.bad_samples.on_host", lambda tensor: False)  # the batches as if on a GPU
    raw = [batch(4, {1: 5} if i % 2 else {}) * torch.tensor(STD).view(1, 3, 1, 1) * 255
           + torch.tensor(MEAN).view(1, 3, 1, 1) * 255 for i in range(4)]
    raw = [(r.round().to(torch.uint8), torch.arange(4)) for r in raw]  # the CUDA pipeline's uint8 batches
    for batches in (raw, [(batch(4, {1: 5} if i % 2 else {}), torch.arange(4)) for i in range(4)]):
        stream = iter(CheckedBatches(Batches(batches), Path("train.beton"), make_config("tiny"), SkippedSamples(8)))
        next(stream)
        with DispatchSyncs() as syncs:
            rest = list(stream)
        assert len(rest) == 3 and dict(syncs.calls) == {}
    weight = torch.tensor(0.5)
    with DispatchSyncs() as control:  # the control: the same read by an index list, and a value read in C++
        raw[0][0][:, :, [0, -1], 0]
        torch._foreach_lerp_([torch.zeros(2)], [torch.ones(2)], weight)
    assert control.calls["lift_fresh"] == 1 and control.calls["_local_scalar_dense"] >= 1


def test_raw_batches_are_normalised_as_ffcvs_cpu_pipeline_does():
    pixels = torch.randint(0, 256, (3, 3, 6, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    checked = CheckedBatches(Batches([(pixels, torch.arange(3))]), Path("x.beton"), make_config("tiny"),
                             SkippedSamples(4))
    (images, _), = list(checked)
    assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
    data = make_config("tiny").data
    expected = (pixels / 255 - torch.tensor(data.mean).view(1, 3, 1, 1)) / torch.tensor(data.std).view(1, 3, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5)


def test_the_cuda_pipeline_needs_no_module_that_ddmim_does_not_install(monkeypatch):
    """FFCV compiles each operation after ToDevice in its GPU form; NormalizeImage's imports cupy."""
    import numpy as np
    from ffcv.pipeline.state import State

    from ddmim.data.ffcv_loader import image_pipeline

    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # import cupy fails, as where it is missing
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here to put a table on
    decoder, *rest = image_pipeline(object(), LoaderSpec.of(make_config("tiny")), torch.device("cuda"))
    state = State(jit_mode=True, device=torch.device("cpu"), dtype=np.dtype("uint8"), shape=(32, 32, 3))
    for operation in rest:
        state, _ = operation.declare_state_and_memory(state)
        operation.generate_code()
    assert state.device == torch.device("cuda") and state.shape == (3, 32, 32)
