"""The model's loss with `kernels: triton` equals the `torch` path; the option is refused where it cannot run.

Everything is built on DEVICE: a GPU where there is one (the GPU suite runs this file there without Triton's
interpreter, whose kernels refuse CPU tensors), else the CPU under the interpreter."""
import pytest
import torch

from ddmim.config import make_config
from ddmim.errors import UserError
from ddmim.models.ddmim import DDMIM
from ddmim.models.factory import pretraining_model
from ddmim.models.kernels import check_kernels, resolve_kernels

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(kernels: str) -> DDMIM:
    kernels = resolve_kernels(kernels, cuda=DEVICE.type == "cuda")
    return pretraining_model(make_config("tiny"), kernels=kernels).to(DEVICE)


def _losses_and_grads(kernels, images, base, masks):
    torch.manual_seed(0)
    model = _model(kernels)
    out = model(images, base, masks)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("normalize", ["all", "masked"])
def test_triton_path_equals_torch_path(normalize):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model = _model("torch")
    base, masks = model.draw_masks(4, seed=3, device=DEVICE)
    ref, ref_grads = _losses_and_grads("torch", images, base, masks)
    fused, fused_grads = _losses_and_grads("triton", images, base, masks)
    assert ref.keys() == fused.keys()
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
    assert ref_grads.keys() == fused_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_model_draws_masks_with_the_kernel():
    model = _model("triton")
    assert model.kernels.triton
    base, masks = model.draw_masks(2, seed=0, index=3, device=DEVICE)
    assert base.shape == (2, 16, 16) and masks[3] is None and base.device.type == DEVICE.type
    assert torch.equal(masks[2], base[:, ::4, ::4])
    assert torch.equal(model.draw_masks(2, seed=0, index=3, device=DEVICE)[0], base)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_triton_without_cuda_or_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="needs a CUDA device"):
        check_kernels("triton")
    check_kernels("auto")
    check_kernels("torch")
    assert not resolve_kernels("auto", cuda=False).triton  # chosen once, for the machine the run is on
