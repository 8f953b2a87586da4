"""The step loop every stage runs: resume, progress bar, metrics, periodic evaluation and
checkpoints, final evaluation (``eval.json``) and export (``final/``).

A stage builds its model, optimizer, scheduler and :class:`EpochBatches`, then hands the loop a
``step_fn(indices, step) -> metrics`` that does the stage's work on one batch (forward, backward and
as many optimizer updates as its recipe wants) and, optionally, ``eval_fn() -> metrics`` and
``export_fn(folder)``.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.utils import logging as hf_logging

from ..config import dump_yaml
from ..models.packing import set_packing
from . import distributed, parallel
from .batches import EpochBatches
from .checkpoint import Checkpointer, atomic_directory, resolve_resume
from .config import TrainConfig
from .metrics import MetricsLogger, mean_over_ranks, to_floats
from .precision import resolve_device, use_bf16
from .rng import seed_everything

log = logging.getLogger(__name__)

StepFn = Callable[[list[int], int], dict]
EvalFn = Callable[[], dict]
WriteFn = Callable[[Path], None]
ExportFn = Callable[[Path, dict | None], None]

_run_log: logging.Handler | None = None


def _log_to_file(path: Path) -> None:
    """Copy the log to the run folder (replacing the file of a previous run in this process)."""
    global _run_log
    root = logging.getLogger()
    if _run_log is not None:
        root.removeHandler(_run_log)
        _run_log.close()
    _run_log = logging.FileHandler(path, encoding="utf-8")
    _run_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(_run_log)


def start_run(train: TrainConfig, full_config) -> torch.device:
    """Join torch.distributed if launched by torchrun, seed, create the run folder, save the resolved
    config and a log file (rank 0). Returns this rank's device."""
    distributed.init_from_env()
    set_packing(train.packing)
    hf_logging.disable_progress_bar()  # weight loading/saving bars would interleave with ours
    seed_everything(train.seed)
    out = Path(train.output_dir)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(full_config), encoding="utf-8")
        _log_to_file(out / "train.log")
    distributed.barrier()
    device = resolve_device(train.device)
    parallel.set_mixed_precision(use_bf16(train.precision, device))
    return device


def write_json(path: Path, data: dict) -> None:
    """Rank 0 writes ``data`` to ``path`` through a temporary file and a rename."""
    if distributed.is_main():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


class Trainer:
    """Runs ``total_steps`` steps of a stage's ``step_fn`` over ``batches``; owns resuming, logging,
    evaluation, checkpoints (of ``model``, ``optimizer``, ``scheduler``, RNG, batch position and the
    ``state_dict()`` of each object in ``extra_state``, e.g. a KL controller) and export."""

    def __init__(self, cfg: TrainConfig, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 batches: EpochBatches, total_steps: int, extra_state: dict | None = None):
        self.cfg, self.model, self.optimizer, self.scheduler = cfg, model, optimizer, scheduler
        self.batches, self.total_steps = batches, total_steps
        self.extra_state = extra_state or {}
        self.run_dir = Path(cfg.output_dir)
        self.checkpointer = Checkpointer(self.run_dir, cfg.save_total_limit, async_save=cfg.async_save)
        self.step = 0

    def restore(self) -> Path | None:
        """Load the checkpoint ``train.resume`` names (``auto``: the latest complete one), if any."""
        path = resolve_resume(self.cfg.resume, self.run_dir)
        if path is None:
            return None
        state = self.checkpointer.load(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.step = int(state["step"])
        self.batches.load_state_dict(state["batches"])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state[name])
        log.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)
        return path

    def save_checkpoint(self, write_extra: WriteFn | None = None) -> Path:
        return self.checkpointer.save(self.step, model=self.model, optimizer=self.optimizer,
                                      scheduler=self.scheduler,
                                      state={"batches": self.batches.state_dict(),
                                             **{k: v.state_dict() for k, v in self.extra_state.items()}},
                                      write_extra=write_extra)

    def evaluate(self, eval_fn: EvalFn, metrics_logger: MetricsLogger) -> dict[str, float]:
        results = mean_over_ranks(to_floats(eval_fn()))
        metrics_logger.log(self.step, results)
        write_json(self.run_dir / "eval.json", {"step": self.step, **results})
        log.info("eval at step %d: %s", self.step, " ".join(f"{k}={v:.4f}" for k, v in results.items()))
        return results

    def fit(self, step_fn: StepFn, *, eval_fn: EvalFn | None = None, export_fn: ExportFn | None = None,
            write_extra: WriteFn | None = None) -> dict[str, float]:
        """Run steps until ``total_steps``; returns the final evaluation (empty without ``eval_fn``).

        ``write_extra(folder)`` adds files to each checkpoint (model config, tokenizer);
        ``export_fn(folder, state_dict)`` writes the final model into ``output_dir/final`` (atomically);
        ``state_dict`` is the gathered full state of an FSDP2-sharded model, else None."""
        cfg = self.cfg
        metrics_logger = MetricsLogger(self.run_dir)
        results: dict[str, float] = {}
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=not (cfg.progress_bar and distributed.is_main()))
        try:
            with logging_redirect_tqdm():
                while self.step < self.total_steps:
                    indices = self.batches.next()
                    self.step += 1
                    metrics = step_fn(indices, self.step)
                    last = self.step == self.total_steps
                    if self.step % cfg.log_every == 0 or last:
                        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
                        values = mean_over_ranks(to_floats(metrics))
                        metrics_logger.log(self.step, values)
                        bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()
                                         if k.endswith(("loss", "/lr"))})
                    bar.update(1)
                    if eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                        self.evaluate(eval_fn, metrics_logger)
                    if cfg.save_every and (self.step % cfg.save_every == 0 or last):
                        self.save_checkpoint(write_extra)
                self.checkpointer.wait()
                if eval_fn is not None:
                    results = self.evaluate(eval_fn, metrics_logger)
                if export_fn is not None:
                    final = self.run_dir / "final"
                    full = parallel.full_model_state(self.model) if parallel.is_sharded(self.model) else None
                    if distributed.is_main():
                        with atomic_directory(final) as tmp:
                            export_fn(tmp, full)
                        log.info("final model written to %s", final)
                    distributed.barrier()
        finally:
            bar.close()
            metrics_logger.close()
        return results
