"""Where and how a run executes: devices, precision, strategy; 'auto' resolved, impossible choices refused."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from ddmim.errors import UserError

PRECISIONS = ("auto", "32", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp")  # ddp_spawn is left out: the spawned ranks' results never reach the summary


@dataclass
class Launch:
    """Where and how a run executes; `resolve_launch` turns the 'auto' values into concrete ones."""
    accelerator: str = "auto"
    precision: str = "auto"
    devices: int = 1  # processes per node: GPUs, or CPU processes (gloo) on the CPU
    num_nodes: int = 1
    strategy: str = "auto"
    channels_last: bool = False
    max_steps: int = -1
    progress_bar: bool = True


def resolve_launch(launch: Launch) -> Launch:
    """Concrete choices for 'auto', and one clear refusal for what this machine cannot run."""
    cuda = torch.cuda.is_available()
    accelerator, precision = launch.accelerator, launch.precision
    if accelerator == "gpu" and not cuda:
        raise UserError("--accelerator gpu was asked for but no CUDA device is available")
    if accelerator == "auto":
        accelerator = "gpu" if cuda else "cpu"
    if launch.devices < 1 or launch.num_nodes < 1:
        raise UserError("--devices and --num-nodes must be at least 1")
    if launch.max_steps == 0 or launch.max_steps < -1:
        raise UserError(f"--max-steps must be at least 1 (or -1: every epoch), got {launch.max_steps}")
    if accelerator == "gpu" and launch.devices > torch.cuda.device_count():
        raise UserError(f"--devices {launch.devices} asks for more GPUs than this machine has "
                        f"({torch.cuda.device_count()})")
    if precision == "auto":
        precision = "32" if accelerator != "gpu" else ("bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed")
    if precision == "16-mixed" and accelerator != "gpu":
        raise UserError("--precision 16-mixed needs a CUDA device; use 32 or bf16-mixed on the CPU")
    if precision == "bf16-mixed" and accelerator == "gpu" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16-mixed: this GPU does not support bf16; use 16-mixed or 32")
    if accelerator == "gpu":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain
        torch.backends.cudnn.allow_tf32 = True
    return replace(launch, accelerator=accelerator, precision=precision)


def is_launched_worker() -> bool:
    """True in the processes a launcher started for ranks other than 0 (Lightning, torchrun, SLURM)."""
    return any(int(os.environ.get(name, "0")) > 0 for name in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


