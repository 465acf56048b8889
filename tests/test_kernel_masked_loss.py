"""The fused masked loss against fp64 references, in Triton's CPU interpreter (or on CUDA when present)."""
import pytest
import torch
import torch.nn.functional as F

from ddmim.models.losses import reconstruction_loss
from ddmim.models.masking import pixel_mask
from ddmim_kernels.masked_loss import BLOCK, masked_loss, masked_loss_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# (B, C, H, W, patch): batch 1, non-power-of-two sizes, patch 4 and 32
SHAPES = [(1, 3, 8, 12, 4), (3, 3, 20, 28, 4), (2, 3, 64, 96, 32), (2, 1, 36, 44, 4)]
MODES = [("smooth_l1", 1.0), ("smooth_l1", 0.5), ("smooth_l1", 0.0), ("l2", 1.0)]


def reference(pred, target, mask, mode, beta, normalize):
    """fp64 loss of the masked pixels, written out independently of the kernel."""
    d = pred.double() - target.double()
    if mode == "l2":
        per = d * d
    elif beta == 0:
        per = d.abs()
    else:
        per = torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)
    if mask is None:
        return per.mean()
    hidden = 1.0 - pixel_mask(mask.double(), pred.shape[-1] // mask.shape[-1])
    total = (per * hidden).sum()
    if normalize == "all":
        return total / per.numel()
    return total / (hidden.sum() * pred.shape[1]).clamp_min(1.0)


def make_inputs(shape, dtype, channels_last, masked_share, seed=0):
    B, C, H, W, p = shape
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)
    target = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype)
    mask = (torch.rand(B, H // p, W // p, generator=g) >= masked_share).to(DEVICE)
    if channels_last:
        pred, target = (x.contiguous(memory_format=torch.channels_last) for x in (pred, target))
    return pred, target, mask


def assert_matches(pred, target, mask, mode, beta, normalize, tol):
    expected_pred = pred.detach().double().requires_grad_()
    expected = reference(expected_pred, target, mask, mode, beta, normalize)
    expected.backward()
    # poisoned buffers: any element the kernel does not write stays NaN and fails the comparison
    grad_buf = torch.full_like(pred, float("nan"))
    partials = torch.full((-(-pred.numel() // BLOCK),), float("nan"), device=pred.device)
    loss, grad = masked_loss_forward(pred, target, mask, mode=mode, beta=beta, normalize=normalize,
                                     write_grad=True, grad_out=grad_buf, partials=partials)
    assert grad.data_ptr() == grad_buf.data_ptr() and grad.stride() == pred.stride()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tol, atol=tol * 1e-3)
    ref_grad = expected_pred.grad
    scale = ref_grad.abs().max().item() or 1.0
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("normalize", ["all", "masked"])
@pytest.mark.parametrize("mode, beta", MODES)
def test_masked_loss_and_gradient_match_fp64_reference(shape, dtype, channels_last, normalize, mode, beta):
    pred, target, mask = make_inputs(shape, dtype, channels_last, 0.5)
    assert_matches(pred, target, mask, mode, beta, normalize, TOL[dtype])


@pytest.mark.parametrize("masked_share, expect_zero", [(1.1, False), (-0.1, True)])  # all masked / none masked
@pytest.mark.parametrize("normalize", ["all", "masked"])
def test_all_and_none_masked(masked_share, expect_zero, normalize):
    pred, target, mask = make_inputs((2, 3, 16, 24, 4), torch.float32, False, masked_share)
    assert_matches(pred, target, mask, "smooth_l1", 1.0, normalize, 1e-5)
    loss = masked_loss(pred, target, mask, normalize=normalize)
    assert (loss.item() == 0.0) == expect_zero


@pytest.mark.parametrize("normalize", ["all", "masked"])
def test_autograd_function_equals_the_foundation_reference(normalize):
    pred, target, mask = make_inputs((2, 3, 32, 32, 4), torch.float32, False, 0.5, seed=1)
    a = pred.clone().requires_grad_()
    b = pred.clone().requires_grad_()
    fused = masked_loss(a, target, mask, normalize=normalize)
    ref = reconstruction_loss(b, target, mask.float(), normalize=normalize)
    (fused * 3.0).backward()  # backward only scales the stored gradient by the incoming one
    (ref * 3.0).backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def test_target_gradient_is_the_negated_pred_gradient():
    pred, target, mask = make_inputs((1, 3, 8, 8, 4), torch.float32, False, 0.5)
    pred.requires_grad_()
    target.requires_grad_()
    masked_loss(pred, target, mask).backward()
    torch.testing.assert_close(target.grad, -pred.grad)


@pytest.mark.parametrize("shape", [(2, 49, 24), (1, 7, 5, 12), (3, 14, 14, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_unmasked_feature_loss(shape, dtype, beta):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    t = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    loss = masked_loss(s, t, None, beta=beta)
    loss.backward()
    ref_in = s.detach().double().requires_grad_()
    ref = F.smooth_l1_loss(ref_in, t.double(), beta=beta) if beta else F.l1_loss(ref_in, t.double())
    ref.backward()
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=0)
    torch.testing.assert_close(s.grad.double(), ref_in.grad, rtol=tol, atol=tol * ref_in.grad.abs().max().item())


@pytest.mark.parametrize("where", ["pred_visible", "pred_masked", "target"])
def test_nan_in_an_input_propagates(where):
    pred, target, mask = make_inputs((1, 3, 8, 8, 4), torch.float32, False, 0.5)
    mask[0, 0, 0], mask[0, 1, 1] = True, False  # token (0,0) visible, token (1,1) masked
    if where == "pred_visible":
        pred[0, 0, 0, 0] = float("nan")
    elif where == "pred_masked":
        pred[0, 0, 5, 5] = float("nan")
    else:
        target[0, 2, 6, 6] = float("nan")
    assert torch.isnan(masked_loss(pred, target, mask))


def test_result_is_deterministic():
    pred, target, mask = make_inputs((4, 3, 64, 64, 4), torch.float32, False, 0.5)
    first = masked_loss(pred, target, mask)
    assert all(torch.equal(masked_loss(pred, target, mask), first) for _ in range(3))


@pytest.mark.parametrize("change, message", [
    (lambda p, t, m: (p, t[:, :, :-4], m), "target has shape"),
    (lambda p, t, m: (p, t.double(), m), "target has dtype torch.float64; expected one of"),
    (lambda p, t, m: (p, t, m[:, :, :-1]), "does not divide the image size"),
    (lambda p, t, m: (p, t, m[:1]), "mask must be"),
    (lambda p, t, m: (p.long(), t.long(), m), "pred has dtype"),
    (lambda p, t, m: (p, t.transpose(2, 3), m), "target must be contiguous or channels-last"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(change, message):
    pred, target, mask = make_inputs((2, 3, 16, 16, 4), torch.float32, False, 0.5)
    with pytest.raises(ValueError, match=message):
        masked_loss(*change(pred, target, mask))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of CPU tensors on a CPU-only machine")
def test_cpu_tensors_are_refused_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    pred, target, mask = make_inputs((1, 3, 8, 8, 4), torch.float32, False, 0.5)
    with pytest.raises(ValueError, match="pred is on cpu.*needs CUDA tensors"):
        masked_loss(pred, target, mask)


@pytest.mark.parametrize("pred_cl, target_cl", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("pred_dtype", [torch.float32, torch.bfloat16])
def test_each_input_is_read_in_its_own_layout_and_dtype(pred_cl, target_cl, pred_dtype):
    """What the decoder and the loader produce: a bf16 prediction beside fp32 images, in either layout: no copy,
    and the loss against the fp32 target (the reference's), not a target rounded to bf16."""
    pred, _, mask = make_inputs((2, 3, 20, 28, 4), pred_dtype, pred_cl, 0.5)
    _, target, _ = make_inputs((2, 3, 20, 28, 4), torch.float32, target_cl, 0.5, seed=7)
    pred.requires_grad_()
    loss = masked_loss(pred, target, mask)
    loss.backward()
    ref_in = pred.detach().double().requires_grad_()
    ref = reference(ref_in, target.contiguous(), mask, "smooth_l1", 1.0, "all")
    ref.backward()
    tol = TOL[pred_dtype] if pred_dtype != torch.float32 else 1e-5
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-8)  # fp32 arithmetic either way
    assert pred.grad.stride() == pred.stride()
    torch.testing.assert_close(pred.grad.double(), ref_in.grad, rtol=tol, atol=tol * ref_in.grad.abs().max().item())


def test_second_backward_is_refused_not_wrong():
    pred, target, mask = make_inputs((1, 3, 8, 8, 4), torch.float32, False, 0.5)
    pred.requires_grad_()
    loss = masked_loss(pred, target, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
