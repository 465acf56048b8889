"""`ddmim train --benchmark STEPS`: the model's ceiling, the real pipeline, and the loader alone, in one run.

1. the loader alone: training batches drawn and dropped, images/s;
2. model only: STEPS training steps on one synthetic batch already on the device;
3. end to end: STEPS training steps with the real loader; images/s and the share of step time spent
   waiting for data. With a known GPU, model FLOP utilisation from a FLOP count of one step.
A step is an optimiser step of the run's global batch on one device (`train.global_batch`: its micro-batches
accumulated). The first warm-up micro-batches of each part are not timed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from ddmim.config import Config
from ddmim.data import make_datamodule
from ddmim.machine import peak_flops, user_results_folder, write_results
from ddmim.train.accumulation import accumulation
from ddmim.train.callbacks import ThroughputReport
from ddmim.train.compile import compile_line, compile_report
from ddmim.train.launch import Launch, resolve_launch
from ddmim.train.pretrain_module import DDMIMModule
from ddmim.train.trainer import quiet_third_party_noise

WARMUP = 5


class OnDevice:
    """The same batch `steps` times: no loading at all."""

    def __init__(self, batch, steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def _trainer(launch: Launch, steps: int, accumulate: int, folder: Path, throughput: ThroughputReport) -> pl.Trainer:
    return pl.Trainer(accelerator=launch.accelerator, devices=1, precision=launch.precision, max_steps=steps,
                      accumulate_grad_batches=accumulate,
                      limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[throughput], default_root_dir=folder,
                      inference_mode=False)


def loader_rate(datamodule, trainer: pl.Trainer, steps: int) -> float:
    datamodule.trainer = trainer  # the fast loaders read the device and ranks from it
    loader = datamodule.train_dataloader()

    def batches():  # epoch after epoch, as training draws them
        while True:
            yield from loader

    stream = batches()
    for _ in range(WARMUP):
        next(stream)
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        images += len(next(stream)[0])
    return images / (time.perf_counter() - start)


def run_benchmark(cfg: Config, data_root: Path, steps: int, launch: Launch | None = None,
                  data_format: str = "auto", results: Path | None = None) -> dict:
    """`results`: the folder for the JSON (default: the user's cache, ~/.cache/ddmim/benchmarks)."""
    launch = resolve_launch(launch or Launch())
    quiet_third_party_noise()
    total = steps + WARMUP
    size, batch = cfg.model.img_size, cfg.train.batch_size
    accumulate = accumulation(cfg.train.global_batch, batch, cfg.train.accumulate, 1)
    datamodule = make_datamodule(data_root, cfg, data_format, channels_last=launch.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ceiling, real = ThroughputReport(warmup=WARMUP), ThroughputReport(warmup=WARMUP)
        pl.seed_everything(cfg.train.seed, verbose=False)
        module = DDMIMModule(cfg, channels_last=launch.channels_last, cuda=launch.accelerator == "gpu")
        trainer = _trainer(launch, total, accumulate, folder, ceiling)
        device = trainer.strategy.root_device
        synthetic = (torch.randn(batch, 3, size, size, device=device),
                     torch.zeros(batch, dtype=torch.long, device=device))
        loader_images_per_s = loader_rate(datamodule, trainer, steps)
        trainer.fit(module, train_dataloaders=OnDevice(synthetic, total * accumulate))
        flops = module.to(device).flops_per_image(batch) * batch
        compiled = compile_report(module.compiled)
        module = DDMIMModule(cfg, channels_last=launch.channels_last, cuda=device.type == "cuda")
        _trainer(launch, total, accumulate, folder, real).fit(module, datamodule=datamodule)
    peak = peak_flops(launch.precision)
    steps_per_s = ceiling.images_per_s / batch
    result = {
        "preset": cfg.name, "data": str(data_root), "device": str(device), "precision": launch.precision,
        "channels_last": launch.channels_last, "kernels": cfg.train.kernels, **compiled,
        "batch": batch, "accumulate": accumulate, "img_size": size, "steps": steps,
        "model_only_images_per_s": ceiling.images_per_s,
        "end_to_end_images_per_s": real.images_per_s,
        "loader_stall_share": real.data_wait_share,
        "loader_images_per_s": loader_images_per_s,
        "flops_per_step": flops,
        "mfu": flops * steps_per_s / peak if peak else None,
    }
    result["results_file"] = str(write_results("train-benchmark", result, results or user_results_folder()))
    return result


def format_benchmark(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no known GPU peak)"
    return "\n".join([
        f"benchmark: preset {r['preset']}, {r['img_size']} px, batch {r['batch']}"
        f"{'' if r['accumulate'] == 1 else ' x ' + str(r['accumulate']) + ' micro-batches a step'}, {r['device']}, "
        f"{r['precision']}, {r['steps']} timed steps",
        f"  model only (synthetic batch on device)  {r['model_only_images_per_s']:.1f} images/s",
        f"  end to end (real loader)                {r['end_to_end_images_per_s']:.1f} images/s, "
        f"loader stall {100 * r['loader_stall_share']:.1f}% of step time",
        f"  loader alone                            {r['loader_images_per_s']:.1f} images/s",
        f"  FLOPs per step {r['flops_per_step'] / 1e9:.1f} G, model FLOP utilisation {mfu}",
        compile_line(r) if r["compile"] != "off" else "  torch.compile   off",
        f"  JSON: {r['results_file']}",
    ])
