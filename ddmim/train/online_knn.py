"""`val/knn_top1` during pretraining: how well the student's features separate the classes, watched while it
trains (solo-learn's online k-NN), not only afterwards.

At every `eval.every_epochs`-th validation (and the one before training) the student backbone's pooled
features of the validation images are kept; the split's even-numbered images are the k-NN bank and its odd
ones the queries, so it needs no data of its own and every format gives it: the validation split is fixed
and labeled (a held-out part of a labeled source, or its val split). Under data parallelism each rank's part
of the split is its own bank and the ranks' hits are summed. Its cost is one backbone forward per validation
image, against a student and teacher forward and a backward per training image.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from ddmim.errors import UserError
from ddmim.probes import feature_dtype, knn_predict, pooled_features

KEY = "val/knn_top1"


class OnlineKnn(pl.Callback):
    def __init__(self, every_epochs: int, k: int = 20, temperature: float = 0.07):
        self.every, self.k, self.temperature = every_epochs, k, temperature
        self.history: list[float] = []
        self.steps: list[int] = []
        self._feats: list[torch.Tensor] | None = None
        self._labels: list[torch.Tensor] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self._require_labels(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._require_labels(trainer)

    def _require_labels(self, trainer) -> None:
        if getattr(trainer.datamodule, "num_classes", 0) < 2:
            raise UserError("eval.every_epochs needs a labeled source of at least 2 classes (class folders, a "
                            "file list with labels); this one has none: set eval.every_epochs=0")

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        due = trainer.state.fn == "validate" or (trainer.current_epoch + 1) % self.every == 0
        self._feats = [] if due and not trainer.sanity_checking else None
        self._labels = []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._feats is None:
            return
        feats = pooled_features(pl_module.model.student.net, pl_module._images(batch))
        self._feats.append(feats.to(feature_dtype(feats.device)))
        self._labels.append(batch[1])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._feats:
            return
        feats, labels = torch.cat(self._feats), torch.cat(self._labels).to(self._feats[0].device)
        self._feats = None
        bank, queries = slice(0, None, 2), slice(1, None, 2)
        predicted = knn_predict(feats[bank], labels[bank], feats[queries], trainer.datamodule.num_classes,
                                self.k, self.temperature)
        hits = torch.stack([(predicted == labels[queries]).sum(), torch.tensor(len(predicted), device=feats.device)])
        hits = trainer.strategy.reduce(hits.float(), reduce_op="sum")
        top1 = 100.0 * hits[0] / hits[1].clamp_min(1)
        pl_module.log(KEY, top1, prog_bar=True)
        self.history.append(float(top1))
        self.steps.append(trainer.global_step)
