"""Metric sinks: ``metrics.jsonl`` in the run folder and TensorBoard when it is installed (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from . import distributed

log = logging.getLogger(__name__)


def to_floats(metrics: dict) -> dict[str, float]:
    """Tensors and numbers -> Python floats (one host sync for all tensors)."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    out = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        values = torch.stack([t.detach().float().reshape(()) for t in tensors.values()]).cpu().tolist()
        out.update(zip(tensors, values))
    return out


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    if not distributed.is_distributed() or not metrics:
        return metrics
    t = torch.tensor(list(metrics.values()), dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    distributed.all_reduce_(t, "mean")
    return dict(zip(metrics, t.tolist()))


class MetricsLogger:
    """Appends ``{"step": N, "time": s, **metrics}`` lines to ``metrics.jsonl``; mirrors to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.enabled = distributed.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self._start = time.time()
        self._tb = None
        if self.enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
