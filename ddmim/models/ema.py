"""The EMA teacher: a gradient-free copy of the student's stages, updated as d * teacher + (1 - d) * student."""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(stages: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(stages)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float, skip: torch.Tensor | None = None) -> None:
    """In place: parameters become decay * teacher + (1 - decay) * student; buffers are copied. `skip`, a 0-dim
    device tensor (1: the optimiser skipped this step), leaves the teacher as it is without the host reading it."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if skip is None:
        torch._foreach_mul_(t_params, decay)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)
        return
    torch._foreach_lerp_(t_params, s_params, (1.0 - decay) * (1.0 - skip.to(t_params[0].dtype)))
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        t_buf.copy_(s_buf)
