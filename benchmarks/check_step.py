"""Is a training step ready for a GPU? Counts the host-device synchronisations of real Lightning steps, and the
graphs and graph breaks torch.compile would make of the training forward.

    python benchmarks/check_step.py --preset seed [--finetune] [--batches ffcv] [--steps 4] [--json PATH]

1. Syncs: `ddmim train`'s Trainer (its callbacks, loggers and checkpoints) runs the preset's module on a
   synthetic batch already on the device, with logging and throughput reports far apart. During every step
   that neither logs nor reports, each call that would make the host wait for a GPU is counted, at the Python
   level: Tensor.item, __bool__, __float__, __int__, tolist, cpu, nonzero (and torch.nonzero), boolean-mask
   indexing, torch.cuda.synchronize (not numpy: a device tensor has none, the wait is the .cpu() before it).
   On a CPU they cost nothing, but they are the same calls. Fine-tuning runs the batch RandAugment of the FFCV
   and DALI loaders where the preset sets one. The same windows are counted at the dispatcher too
   (`DispatchSyncs`), which also sees the reads made in C++. `--batches ffcv` hands the step what FFCV gives
   on a GPU (raw uint8 pixels in channels-last memory, through ddmim's batch check and normalisation, on its
   device path as on a GPU), `--batches dali` what DALI gives (normalised HWC batches viewed as NCHW).
2. Graphs: `torch._dynamo.explain` of the training forward: graphs, breaks (with reasons), ops per graph.
Prints and writes one JSON object (benchmarks/results/check-step-<device>.json, or --json).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from unittest import mock

import pytorch_lightning as pl
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the checkout's packages first

from benchmarks.common import write_results
from ddmim.config import config_from_dict, preset_values, with_overrides
from ddmim.finetune_config import finetune_config_from_dict
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.speed_test import OnDevice
from ddmim.train.trainer import build_trainer

BLOCKING_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "nonzero")


class DispatchSyncs(TorchDispatchMode):
    """Counts, at the dispatcher, the operators that make a host wait for a GPU or copy host data to it: reads of
    a value (`_local_scalar_dense`, behind .item(), bool() and C++ reads such as `_foreach_lerp_` with a tensor
    weight, which Python-level patches miss), data-dependent shapes (nonzero, masked_select, unique) and
    tensors built from Python data inside an operator (`lift_fresh`, as in `x[:, [0, -1]]`)."""

    OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
           "unique_consecutive", "lift_fresh")

    def __init__(self, gate=None):
        """`gate`: counts only while `gate.active` (a SyncCounter's window), else always."""
        super().__init__()
        self.calls: Counter = Counter()
        self.where: list[str] = []  # the Python line that led to each call counted, for the message
        self.gate = gate

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS and (self.gate is None or self.gate.active):
            self.calls[name] += 1
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/utils/_python_dispatch" not in f.filename]
            self.where.append(f"{name} at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-4:]))
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts blocking calls while `active`; patches torch at the Python level for the `patched()` block."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.active = False

    def _count(self, name: str, original):
        def wrapper(*args, **kwargs):
            if self.active:
                self.calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def patched(self):
        saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in BLOCKING_METHODS]
        saved += [(torch, "nonzero", torch.nonzero), (torch.cuda, "synchronize", torch.cuda.synchronize),
                  (torch.Tensor, "__getitem__", torch.Tensor.__getitem__)]
        getitem = torch.Tensor.__getitem__

        def indexing(tensor, index):
            parts = index if isinstance(index, tuple) else (index,)
            if self.active and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                self.calls["boolean-mask indexing"] += 1
            return getitem(tensor, index)

        try:
            for owner, name, original in saved[:-1]:
                label = f"torch.{name}" if owner is torch else ("torch.cuda.synchronize" if owner is torch.cuda
                                                                else f"Tensor.{name}")
                setattr(owner, name, self._count(label, original))
            torch.Tensor.__getitem__ = indexing
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


class CountQuietSteps(pl.Callback):
    """Counts during the steps from `first` on that neither log nor report, one window per step (from the start of
    one training batch to the start of the next: the step, its backward, optimiser step and callbacks)."""

    def __init__(self, counter: SyncCounter, first: int, log_every: int, last: int):
        self.counter, self.first, self.log_every, self.last = counter, first, log_every, last
        self.steps = 0
        self._before: Counter = Counter()

    def _close(self) -> None:
        if self.counter.active:
            self.counter.active = False
            self.steps += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        step = trainer.global_step
        quiet = (step + 1) % self.log_every != 0 and step + 1 < self.last
        if step >= self.first and quiet:
            self.counter.active = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()


BATCHES = ("synthetic", "ffcv", "dali")


def loader_batches(kind: str, cfg, device: torch.device, batch: int, steps: int):
    """`steps` batches shaped as the loader `kind` hands them to the step on a GPU, and a context to count in."""
    size, labels = cfg.model.img_size, torch.arange(batch, device=device) % 10
    if kind == "synthetic":
        return OnDevice((torch.randn(batch, 3, size, size, device=device), labels), steps), contextlib.nullcontext()
    if kind == "dali":  # normalised HWC batches, which DaliLoader views as NCHW in channels-last memory
        hwc = torch.randn(batch, size, size, 3, device=device)
        return OnDevice((hwc.permute(0, 3, 1, 2), labels), steps), contextlib.nullcontext()
    from ddmim.data.bad_samples import SkippedSamples
    from ddmim.data.ffcv_loader import CheckedBatches

    raw = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    checked = CheckedBatches(OnDevice((raw, labels), steps), Path("synthetic.beton"), cfg, SkippedSamples(batch))
    # the batch check's device path, which a GPU takes, where a CPU would read the flags on the host
    return checked, mock.patch("ddmim.data.bad_samples.on_host", lambda tensor: False)


def count_syncs(preset: str, finetune: bool, steps: int, batch: int, overrides: list[str],
                batches: str = "synthetic") -> dict:
    from ddmim.train.finetune import FinetuneModule
    from ddmim.train.pretrain_module import DDMIMModule

    first, log_every = 3, 10_000  # the first steps compile, count FLOPs and warm up
    typed = {"train.batch_size": batch, "train.log_every": log_every, "train.report_every": 0,
             "data.num_workers": 0}
    values = with_overrides(preset_values(preset, overrides, kind="finetune" if finetune else "pretrain"),
                            typed=typed)
    cfg = (finetune_config_from_dict if finetune else config_from_dict)(values)
    total = first + steps + 1  # the last step ends an epoch, where the throughput report waits for the device
    launch = resolve_launch(Launch(max_steps=total, progress_bar=False))
    module = (FinetuneModule(cfg, num_classes=10, batch_randaugment=True) if finetune
              else DDMIMModule(cfg, cuda=launch.accelerator == "gpu"))
    counter = SyncCounter()
    counting = CountQuietSteps(counter, first, log_every, total)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_trainer(Path(tmp), cfg, launch)
        run.trainer.callbacks.append(counting)
        loader, placement = loader_batches(batches, cfg, run.trainer.strategy.root_device, batch, total)
        with placement, counter.patched(), DispatchSyncs(gate=counter) as dispatched:
            run.trainer.fit(module, train_dataloaders=loader)
    steps = max(1, counting.steps)
    return {"steps_counted": counting.steps, "syncs_per_step": sum(counter.calls.values()) / steps,
            "calls": dict(counter.calls), "dispatch_syncs_per_step": sum(dispatched.calls.values()) / steps,
            "dispatch_calls": dict(dispatched.calls), "dispatch_where": dispatched.where}


def explain_forward(preset: str, finetune: bool, batch: int, overrides: list[str]) -> dict:
    from ddmim.config import make_config
    from ddmim.finetune_config import make_finetune_config
    from ddmim.models.factory import classifier, pretraining_model

    torch._dynamo.reset()
    if finetune:
        cfg = make_finetune_config(preset, overrides)
        model = classifier(cfg.model, 10, cfg.head.kind, cfg.head.hidden, cfg.augment.drop_path)
        size = cfg.model.img_size
        args = (torch.randn(batch, 3, size, size),)
    else:
        cfg = make_config(preset, overrides)
        model = pretraining_model(cfg)
        size = cfg.model.img_size
        base, masks = model.draw_masks(batch, seed=0)
        args = (torch.randn(batch, 3, size, size), base, masks)
    model.train()
    explained = torch._dynamo.explain(model)(*args)
    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "break_reasons": [str(b.reason)[:200] for b in explained.break_reasons],
            "ops_per_graph": [sum(1 for n in g.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
                              for g in explained.graphs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--finetune", action="store_true", help="a fine-tuning preset")
    parser.add_argument("--steps", type=int, default=3, help="quiet steps counted")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", choices=BATCHES, default="synthetic", help="shaped as this loader gives them")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {"preset": args.preset, "kind": "finetune" if args.finetune else "pretrain", "batches": args.batches,
              **count_syncs(args.preset, args.finetune, args.steps, args.batch, args.overrides, args.batches),
              **explain_forward(args.preset, args.finetune, args.batch, args.overrides)}
    print(f"{result['kind']} {args.preset} ({args.batches} batches): {result['syncs_per_step']:g} syncs per quiet step "
          f"({result['calls'] or 'none'}), {result['dispatch_syncs_per_step']:g} at the dispatcher "
          f"({result['dispatch_calls'] or 'none'}); {result['graphs']} graph(s), {result['graph_breaks']} break(s), "
          f"ops per graph {result['ops_per_graph']}")
    for reason in result["break_reasons"]:
        print(f"  break: {reason}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"wrote {write_results('check-step', {'device': device, **result}, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
