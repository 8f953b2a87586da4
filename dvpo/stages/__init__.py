"""Training stages, one ``dvpo`` subcommand each; importing a stage module registers it."""
from . import dvpo, gvm, ppo, sft  # noqa: F401  (each registers its stage)
from .registry import STAGES, Stage, register_stage

__all__ = ["STAGES", "Stage", "register_stage"]
