"""Every exchange between the ranks of a data-parallel run that a loader makes, over a gloo group of CPU tensors
(so no exchange waits for a device); in one process (no group) each is what one rank alone would get."""
from __future__ import annotations

import torch
import torch.distributed as dist


class _Done:
    def __init__(self, value: bool):
        self.value = value

    def wait(self) -> bool:
        return self.value


class _Pending:
    def __init__(self, work, flag: torch.Tensor):
        self.work, self.flag = work, flag

    def wait(self) -> bool:
        self.work.wait()
        return bool(self.flag[0])


class RankExchange:
    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1

    @property
    def shared(self) -> bool:
        return self.group is not None

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order."""
        if self.group is None:
            return [value]
        found = [None] * self.world
        dist.all_gather_object(found, value, group=self.group)
        return found

    def _reduce(self, value: int, op) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value])
        dist.all_reduce(t, op=op, group=self.group)
        return int(t.item())

    def min(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MIN)

    def max(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def any_later(self, flag: bool):
        """Starts asking whether any rank's `flag` is set; the answer's `wait()` gives it. The exchange runs in the
        background, so a rank that asks at one step and reads at its next does not wait."""
        if self.group is None:
            return _Done(flag)
        t = torch.zeros(1, dtype=torch.int32)
        t[0] = int(flag)
        return _Pending(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
