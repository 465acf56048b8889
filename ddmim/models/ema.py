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
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if skip is None:
        torch._foreach_mul_(t_params, decay)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - decay)
    else:
        # not _foreach_lerp_: with a 0-dim tensor weight it binds to its Scalar overload and reads the weight on the
        # host, a synchronisation at every update. teacher * (1 - w) + student * w keeps a weight of 1 an exact
        # copy and 0 the teacher as it is (the student's weights stay finite when its step is skipped)
        weight = (1.0 - decay) * (1.0 - skip.to(t_params[0].dtype))
        torch._foreach_mul_(t_params, 1.0 - weight)
        torch._foreach_add_(t_params, torch._foreach_mul(s_params, weight))
    t_buffers = list(teacher.buffers())
    if t_buffers:  # one call for all of them (41 in the tiny Swin), not one copy each
        torch._foreach_copy_(t_buffers, list(student.buffers()))
