"""Training stages, one ``dvpo`` subcommand each; importing a stage module registers it."""
from . import demo, dpo, dvpo, gvm, ppo, rm, sft, vpo  # noqa: F401  (each registers its stage)
from .registry import STAGES, Stage, register_stage

__all__ = ["STAGES", "Stage", "register_stage"]
