"""Training building blocks shared by the stages: config, seeding, optimiser and schedule,
precision, resumable batching, atomic checkpoints, metrics, torch.distributed hooks, the step loop."""
from . import distributed, grad_sync
from .batches import EpochBatches, micro_batches
from .checkpoint import Checkpointer, atomic_directory, latest_checkpoint, list_checkpoints, resolve_resume
from .config import TrainConfig
from .grad_sync import micro_steps
from .loop import Trainer, start_run, write_json
from .metrics import MetricsLogger, mean_over_ranks, to_floats
from .optim import Bundle, apply_update, build_optimizer, build_scheduler, lr_multiplier, trainable_parameters
from .precision import autocast, generation_autocast, resolve_device, use_bf16
from .rng import rng_state, seed_everything, set_rng_state, step_generator

__all__ = [
    "Bundle", "Checkpointer", "EpochBatches", "MetricsLogger", "TrainConfig", "Trainer", "apply_update",
    "atomic_directory", "autocast", "build_optimizer", "build_scheduler", "distributed", "generation_autocast",
    "grad_sync", "latest_checkpoint", "list_checkpoints", "lr_multiplier", "mean_over_ranks", "micro_batches",
    "micro_steps", "resolve_device", "resolve_resume", "rng_state", "seed_everything", "set_rng_state", "start_run",
    "step_generator", "to_floats", "trainable_parameters", "use_bf16", "write_json",
]
