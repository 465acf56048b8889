"""Ahead-of-time compilation of the kernels for a GPU that is not on this machine (Hopper, sm_90, by default).

`record_launches()` intercepts the launches of this package's kernels, so the real launchers can be driven with
meta tensors (no memory, no device) and each launch's arguments kept. `compile_launch` specialises a launch as
Triton's JIT would on that GPU (argument types, 16-byte alignment, divisibility) and compiles it with Triton's own
compiler; `ptxas -v` (Triton's bundled copy) then reads the registers, spills and shared memory off the result.
Needs the real Triton JIT: run it without TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
import triton.backends.nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from ddmim_kernels import checks, mask_gen, masked_loss

LAUNCHERS = (masked_loss, mask_gen)  # the modules whose module-level @triton.jit kernels get recorded


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)
    label: str = ""


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch instead of running it."""

    def __init__(self, kernel: JITFunction, launches: list[Launch], label: str):
        self.kernel, self.launches, self.label = kernel, launches, label

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, args, kwargs, self.label))


@contextlib.contextmanager
def record_launches(label: str = ""):
    """Yields the list that the launches made inside the block are appended to; nothing runs on a device. The
    device checks let meta tensors through, and the loss's custom operator calls its launcher directly (on meta
    tensors a custom operator runs only its shape function)."""
    launches: list[Launch] = []
    saved = []

    def swap(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    for module in LAUNCHERS:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                swap(module, name, _Recorder(value, launches, label))
    for module in (checks, mask_gen):
        swap(module, "check_device", lambda name, tensor: None)
    swap(masked_loss, "_masked_loss_op", lambda pred, target, mask, mode, beta, normalize, write_grad: (
        masked_loss.masked_loss_forward(pred, target, mask, mode=mode, beta=beta, normalize=normalize,
                                        write_grad=write_grad)))
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _ptxas() -> str:
    return os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")


def ptxas_usage(ptx: str, arch: str) -> dict:
    """Registers, spill bytes (stores + loads) and stack of the kernel in `ptx`, from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([_ptxas(), f"-arch={arch}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()}")
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (spills and registers and stack):
        raise RuntimeError(f"unexpected ptxas -v output: {log.strip()}")
    return {"registers": int(registers[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2]),
            "stack_bytes": int(stack[1])}


def _specialise(launch: Launch, target: GPUTarget):
    """What Triton's JIT derives from the launch's arguments on `target`: bound arguments, options, signature,
    constants and attributes (alignment, divisibility)."""
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    return (bound, *kernel._pack_args(backend, launch.kwargs, bound, specialization, options))


def specialisation_key(launch: Launch, capability: int = 90, warp_size: int = 32) -> str:
    """Equal for two launches that Triton would compile into one binary on that GPU."""
    _, options, signature, constexprs, attrs = _specialise(launch, GPUTarget("cuda", capability, warp_size))
    return repr((launch.kernel.__name__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                 sorted(options.__dict__.items())))


def compile_launch(launch: Launch, capability: int = 90, warp_size: int = 32) -> dict:
    """Compiles the launch's specialisation for `cuda` sm_<capability>; returns what it takes of the GPU."""
    target = GPUTarget("cuda", capability, warp_size)
    bound, options, signature, constexprs, attrs = _specialise(launch, target)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"  # as Triton's own ptxas call
    usage = ptxas_usage(compiled.asm["ptx"], arch)
    # 64-bit integer division is a long instruction sequence on the GPU, not one instruction
    usage["div64"] = len(re.findall(r"\b(?:div|rem)\.[su]64\b", compiled.asm["ptx"]))
    pointers = {k: v for k, v in signature.items() if v.startswith("*")}
    constants = {k: v for k, v in bound.items() if signature.get(k) == "constexpr"}
    return {"kernel": launch.kernel.__name__, "label": launch.label, "arch": arch, "pointers": pointers,
            "constants": {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in constants.items()},
            "num_warps": compiled.metadata.num_warps, "shared_bytes": compiled.metadata.shared, **usage}
