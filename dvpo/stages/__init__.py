"""Training stages, one ``dvpo`` subcommand each; importing a stage module registers it."""
from . import gvm  # noqa: F401  (registers ``dvpo gvm``)
from .registry import STAGES, Stage, register_stage

__all__ = ["STAGES", "Stage", "register_stage"]
