"""Training stages, one ``dvpo`` subcommand each; importing a stage module registers it."""
# in the order of a pipeline, the order `dvpo --help` lists them
from . import sft, gvm, dvpo, rm, ppo, dpo, vpo, eval, demo  # noqa: F401, I001  (each registers its stage)
from .. import convert  # noqa: F401, E402, I001  (dvpo convert: a GGUF checkpoint to a Hugging Face folder)
from .registry import STAGES, Stage, register_stage

__all__ = ["STAGES", "Stage", "register_stage"]
