"""The training step is ready for a GPU, checked on the CPU: no host-device synchronisation in steps that neither
log nor report, one compiled graph per training forward, and the fused window attention equal to timm's."""
import pytest
import torch

from benchmarks.bench_attention import relative_error, stage_cases
from benchmarks.check_step import count_syncs, explain_forward
from ddmim.config import make_config, preset_names
from ddmim.data.loader_spec import LoaderSpec
from ddmim.models.swin import MaskedSwin

WORKLOADS = [("seed", False), ("simmim", False), ("mae_vit_s16", False), ("seed", True), ("mim", True)]


@pytest.mark.slow
@pytest.mark.parametrize("preset, finetune, batches", [(*w, "ffcv") for w in WORKLOADS] +
                         [("seed", False, "dali"), ("mim", True, "dali")])
def test_a_quiet_training_step_never_makes_the_host_wait(preset, finetune, batches):
    """Batches as FFCV (raw pixels through the batch check and normalisation) and DALI (channels-last
    memory, the one way its batches differ at the step) give them on a GPU; mim fine-tunes with the batch
    RandAugment."""
    result = count_syncs(preset, finetune, steps=2, batch=2, overrides=[], batches=batches)
    assert result["steps_counted"] == 2
    assert result["syncs_per_step"] == 0, result["calls"]
    assert result["dispatch_syncs_per_step"] == 0, result["dispatch_where"]  # reads made in C++ included


def test_the_count_sees_the_ffcv_batch_check(monkeypatch):
    """The control: a batch check that asks the host whether any sample failed (as one did before it filled
    failures on the device) waits once per quiet step, and the loader's work is inside the counted window."""
    import ddmim.data.ffcv_loader as ffcv_loader

    fill = ffcv_loader.fill_from_others

    def asks_the_host(images, labels, failed, spare):
        if not failed.any():
            return images, labels, spare
        return fill(images, labels, failed, spare)

    monkeypatch.setattr(ffcv_loader, "fill_from_others", asks_the_host)
    result = count_syncs("tiny", False, steps=2, batch=2, overrides=[], batches="ffcv")
    assert result["calls"] == {"Tensor.__bool__": 2} and result["dispatch_calls"] == {"_local_scalar_dense": 2}


def test_the_dispatcher_count_sees_a_read_made_in_cpp(monkeypatch):
    """The control: the EMA update of before, whose _foreach_lerp_ read its weight on the host, counts 1 per
    quiet step of the tiny preset (its teacher updates every step) where the Python-level count saw none."""
    import ddmim.models.ema as ema

    def lerp_update(teacher, student, decay, skip=None):
        weight = (1.0 - decay) * (1.0 - skip.float())
        torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], weight)

    monkeypatch.setattr(ema, "ema_update_", torch.no_grad()(lerp_update))
    monkeypatch.setattr("ddmim.models.ddmim.ema_update_", ema.ema_update_)
    result = count_syncs("tiny", False, steps=2, batch=2, overrides=[])
    assert result["syncs_per_step"] == 0 and result["dispatch_calls"] == {"_local_scalar_dense": 2}


def test_the_sync_count_sees_a_planted_sync(monkeypatch):
    from ddmim.train.pretrain_module import DDMIMModule

    step = DDMIMModule.training_step

    def reads_the_loss(self, batch, batch_idx):
        loss = step(self, batch, batch_idx)
        loss.item()  # what a per-step print of the loss would do
        return loss

    monkeypatch.setattr(DDMIMModule, "training_step", reads_the_loss)
    result = count_syncs("tiny", False, steps=2, batch=4, overrides=[])
    assert result["calls"].get("Tensor.item") == 2 and result["syncs_per_step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("preset, finetune", [(p, False) for p in preset_names("pretrain")] +
                         [(p, True) for p in preset_names("finetune")])
def test_every_preset_traces_its_training_forward_as_one_graph(preset, finetune):
    result = explain_forward(preset, finetune, batch=2, overrides=[])
    assert (result["graphs"], result["graph_breaks"]) == (1, 0), result["break_reasons"]


def test_the_fused_window_attention_equals_timms_at_every_stage_shape():
    """Swin-T at 224 px, each stage's first block (plain windows) and second (shifted, where the grid is wider
    than a window): outputs and every gradient within 1e-5 of the largest value, fp32."""
    cases = 0
    for stage, shifted, timm_attn, fused, x, mask in stage_cases(batch=1, device=torch.device("cpu")):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = timm_attn(xa, mask), fused(xb, mask)
        grad = torch.randn_like(out_a)
        grads_a = torch.autograd.grad(out_a, [xa, *timm_attn.parameters()], grad)
        grads_b = torch.autograd.grad(out_b, [xb, *fused.parameters()], grad)
        assert relative_error(out_a, out_b) < 1e-5, (stage, shifted)
        assert max(relative_error(a, b) for a, b in zip(grads_a, grads_b)) < 1e-5, (stage, shifted)
        cases += 1
    assert cases == 8


def test_the_fused_attention_changes_no_weight_and_no_output():
    cfg = make_config("tiny").model
    args = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
                num_heads=cfg.num_heads, window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, drop_path_rate=0.0,
                head_dim=cfg.head_dim, perceptual_tap=cfg.perceptual_tap)
    torch.manual_seed(0)
    fused = MaskedSwin(**args, fused_attention=True).eval()
    plain = MaskedSwin(**args, fused_attention=False).eval()
    plain.load_state_dict(fused.state_dict(), strict=True)  # the same parameters and buffers, by name
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    for a, b in zip(fused.forward_features(images), plain.forward_features(images)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_window_attention_of_a_swin_t_reaches_a_fused_backend(monkeypatch):
    """Fused SDPA backends take 4-D q/k/v of one dtype and an attention mask that broadcasts to (B, heads, L, S);
    5-D inputs (the shifted windows once) fall back to the math path. PyTorch's own checks need a GPU to run,
    so the shape rules are checked on the calls of a Swin-T forward: 12 blocks, 6 of them shifted."""
    import torch.nn.functional as F

    import ddmim.models.window_attention as window_attention

    calls, sdpa = [], F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.shape, k.shape, v.shape, None if attn_mask is None else attn_mask.shape, q.dtype, k.dtype,
                      v.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(window_attention.F, "scaled_dot_product_attention", recorded)
    cfg = make_config("seed").model
    swin = MaskedSwin(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depths=cfg.depths,
                      num_heads=cfg.num_heads, window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio,
                      drop_path_rate=0.0, head_dim=cfg.head_dim, perceptual_tap=cfg.perceptual_tap,
                      fused_attention=True).eval()
    with torch.no_grad():
        swin.forward_features(torch.randn(1, 3, cfg.img_size, cfg.img_size))
    assert len(calls) == sum(cfg.depths) == 12
    assert all(fused_backend_takes(*call) for call in calls)
    masks = [call[3] for call in calls if call[3] is not None and len(call[3]) >= 3]
    shifted = [mask for mask in masks if mask[-3] > 1 and mask[-3] != cfg.num_heads[0]]
    assert shifted  # heads x windows in the mask's head dimension: the shifted blocks are among them
    # the control: the shifted blocks' call of before, 5-D (B, windows, heads, L, d) with a 5-D mask
    q5 = (2, 64, 3, 49, 32)
    assert not fused_backend_takes(q5, q5, q5, (1, 64, 1, 49, 49), torch.float32, torch.float32, torch.float32)


def fused_backend_takes(q, k, v, mask, *dtypes) -> bool:
    """The shape rules of PyTorch's fused SDPA backends: 4-D q/k/v of one shape and dtype, and an attention mask
    that broadcasts to (B, heads, L, S)."""
    if not (len(q) == len(k) == len(v) == 4 and q == k == v and len(set(dtypes)) == 1):
        return False
    if mask is None:
        return True
    if len(mask) > 4:
        return False
    full = (1,) * (4 - len(mask)) + tuple(mask)
    return all(m in (1, n) for m, n in zip(full, (q[0], q[1], q[2], k[2])))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_the_gpu_dali_pipelines_are_defined_and_serialised_here(converted, train, channels_last, monkeypatch):
    """DALI refuses to build a GPU pipeline without CUDA, but defines and serialises one without a device: every
    operator of the GPU configuration (nvJPEG's "mixed" decoders, the labels moved to the device) is created
    and its arguments checked against DALI's schemas. The control: a wrong argument fails here."""
    from nvidia.dali import fn

    from ddmim.data.dali_pipeline import define_pipeline

    cfg = make_config("tiny")
    options = dict(train=train, gpu=True, device_id=None, channels_last=channels_last, batch_size=4, threads=1)
    folder = converted["dali"] / ("train" if train else "val")
    graph = define_pipeline(folder, LoaderSpec.of(cfg), **options).serialize()
    assert b"mixed" in graph and (b"decoders__ImageRandomCrop" if train else b"decoders__Image") in graph

    resize = fn.resize
    monkeypatch.setattr(fn, "resize", lambda *a, **k: resize(*a, **k, resize_shortest=1))  # no such argument
    with pytest.raises(KeyError, match="resize_shortest"):
        define_pipeline(converted["dali"] / ("train" if train else "val"), LoaderSpec.of(cfg), **options).serialize()


FACTORIES = {"randn", "rand", "zeros", "ones", "empty", "tensor", "arange", "randint", "full", "randperm", "linspace"}


def tensors_made_off_the_kernel_device(source: str) -> list[str]:
    """Tensor factories of a kernel test that name no device and whose result is not moved `.to(DEVICE...)`:
    such a tensor is a CPU tensor, which Triton's CPU interpreter takes and a GPU's kernels refuse."""
    import ast

    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        outer = parents.get(node)
        while outer is not None and not isinstance(outer, ast.Call):
            outer = parents.get(outer)
        moved = (outer is not None and isinstance(outer.func, ast.Attribute) and outer.func.attr == "to"
                 and outer.args and isinstance(outer.args[0], ast.Name) and outer.args[0].id == "DEVICE")
        if not moved:
            found.append(f"line {node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_kernel_tests_make_their_tensors_on_the_kernel_device():
    """The GPU suite's kernel tests run without the interpreter there: a tensor one of them makes on the CPU
    would fail only on the GPU (three did). The control: the way they were written is caught."""
    from pathlib import Path

    for path in sorted(Path(__file__).parent.glob("test_kernel_*.py")):
        assert tensors_made_off_the_kernel_device(path.read_text()) == [], path.name
    before = "images = torch.randn(4, 3, 32, 32, generator=g)\nmask = (torch.rand(4, 8, 8) > 0.5).to(DEVICE)\n"
    assert tensors_made_off_the_kernel_device(before) == ["line 1: torch.randn(4, 3, 32, 32, generator=g)"]
