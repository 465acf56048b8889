"""Loggers that keep a resumed run's history: one continuous record, no step twice, none lost.

Lightning's CSVLogger rewrites metrics.csv when a run starts in an existing log folder, and TensorBoard
would show the steps a killed run logged after its last checkpoint next to the same steps logged again.
Here a resumed run keeps the earlier rows up to the first step it logs itself: the CSV loses the rows of
that step and after, and TensorBoard gets a purge marker at that step, which its readers honour.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from ddmim.atomic import atomic_write


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume: bool):
        self.resume, self._cut_pending = resume, resume
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self.resume:
            return super()._check_log_dir_exists()
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def log_metrics(self, metrics_dict, step=None) -> None:
        if self._cut_pending and step is not None:
            self._cut_pending = False
            self._keep_rows_before(step)
        super().log_metrics(metrics_dict, step)

    def _keep_rows_before(self, step: int) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            rows = [row for row in csv.DictReader(f) if not row.get("step") or int(float(row["step"])) < step]
        self._rewrite(rows, self.metrics_keys)

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        """Lightning rewrites the file in place when a new column appears: a full disk then left it empty."""
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._rewrite(rows, fieldnames)

    def _rewrite(self, rows: list[dict], fieldnames: list[str]) -> None:
        with atomic_write(Path(self.metrics_file_path), newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


class HistoryCSVLogger(CSVLogger):
    def __init__(self, *args, resume: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume = resume

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.resume)
        return self._experiment


class HistoryTensorBoardLogger(TensorBoardLogger):
    def __init__(self, *args, resume: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._purge_pending = resume

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        if self._purge_pending and step is not None:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            self._purge_pending = False
            # what SummaryWriter(purge_step=step) writes: readers drop earlier files' events from `step` on
            marker = Event(step=step, session_log=SessionLog(status=SessionLog.START))
            self.experiment._get_file_writer().add_event(marker)
        super().log_metrics(metrics, step)
