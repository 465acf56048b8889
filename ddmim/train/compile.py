"""torch.compile with an honest fallback: only the compiler's own failures lead to eager execution.

`CompiledForward(module)` compiles `module`'s forward. Its `trial(step)` runs one forward and backward before
training: a backward graph is compiled at its first use, so this is where a failure to compile it shows,
and the trial is undone (gradients, buffers and random streams as before). A failure of the compiler at the
trial or at a later recompilation switches to eager execution with one message; anything else (a CUDA
out-of-memory error, an error in the data) is raised as it is. `report()` says what happened:
compile "on" | "fallback: <reason>" | "off", with the graphs and graph breaks that tracing found.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch._dynamo.exc import InvalidBackend, TorchDynamoException

from ddmim.errors import UserError, say


def _causes(exc: BaseException):
    seen = 0
    while exc is not None and seen < 32:
        yield exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def is_compile_failure(exc: BaseException) -> bool:
    """True for an error of the compiler (dynamo, AOTAutograd, inductor and the code it generates), False for
    an out-of-memory error even when the compiler raised it (autotuning allocates too)."""
    if any(isinstance(e, torch.OutOfMemoryError) for e in _causes(exc)):
        return False
    return isinstance(exc, TorchDynamoException)


def dynamo_counts() -> tuple[int, int, int]:
    """(graphs traced, graph breaks, graphs the backend compiled) in this process so far: dynamo's own counters.
    Under data parallelism dynamo splits each traced graph at the gradient buckets (so that each bucket's
    all-reduce overlaps the rest of the backward), and the backend compiles every part."""
    from torch._dynamo.utils import counters

    return (int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values())),
            int(counters["aot_autograd"]["total"]))


def data_parallel_wrapper(trainer):
    """The DistributedDataParallel module a Lightning trainer runs its module in, or None."""
    from torch.nn.parallel import DistributedDataParallel

    model = trainer.strategy.model
    return model if isinstance(model, DistributedDataParallel) else None


class CompiledForward:
    def __init__(self, module: torch.nn.Module, backend: str = "inductor"):
        self.module = module
        self.backend = backend
        try:
            self._compiled = torch.compile(module, backend=backend)
        except InvalidBackend:
            raise UserError(f"train.compile_backend '{backend}' is not a torch.compile backend; available: "
                            f"{', '.join(torch._dynamo.list_backends())}") from None
        self.status = "on"

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            return self.module(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            self._fall_back(exc)
            return self.module(*args, **kwargs)

    def _fall_back(self, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        self.status = f"fallback: {type(exc).__name__}: {first}"
        self._compiled = None
        say(f"torch.compile failed ({self.status[len('fallback: '):]}); continuing without compilation")

    def trial(self, loss_of: Callable[[Callable], torch.Tensor], ddp=None) -> None:
        """Compiles forward and backward now: `loss_of(forward)` must return a scalar loss of one batch shaped
        like the training batches. Leaves no trace: gradients, buffers (batch-norm statistics) and the random
        streams are restored. `ddp`: the DistributedDataParallel wrapper training runs in. Dynamo splits a graph
        at the gradient buckets only when it compiles inside that wrapper's forward, and training reuses what
        the trial compiled, so the trial compiles there too (the backward does not all-reduce: DDP's forward,
        which arms its hooks, is not run)."""
        if self._compiled is None:
            return
        buffers = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        params = [p for p in self.module.parameters()]
        grads = [p.grad for p in params]
        device = next(iter(params), torch.empty(0)).device
        cuda = [device.index or 0] if device.type == "cuda" else []
        try:
            inside_ddp = ddp._inside_ddp_forward() if ddp is not None else contextlib.nullcontext()
            with torch.random.fork_rng(devices=cuda), inside_ddp:
                loss_of(self._compiled).backward()
        except Exception as exc:
            if not is_compile_failure(exc):
                raise
            self._fall_back(exc)
        finally:
            for p, g in zip(params, grads):
                p.grad = g
            with torch.no_grad():
                for name, b in self.module.named_buffers():
                    b.copy_(buffers[name])

    def report(self) -> dict:
        graphs, breaks, compiled = dynamo_counts()
        return {"compile": self.status, "compile_backend": self.backend, "graphs": graphs, "graph_breaks": breaks,
                "compiled_graphs": compiled}


def compile_line(report: dict) -> str:
    """The summary line of a compile report: traced graphs, breaks, and the parts the backend compiled (more
    than the graphs under data parallelism: one per gradient bucket)."""
    return (f"  torch.compile   {report['compile']} ({report['graphs']} graphs, {report['graph_breaks']} breaks, "
            f"{report['compiled_graphs']} compiled parts)")


def compile_report(compiled: CompiledForward | None) -> dict:
    return compiled.report() if compiled is not None else {"compile": "off"}
