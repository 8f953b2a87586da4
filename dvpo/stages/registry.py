"""The registry of ``dvpo`` subcommands: each stage is a config dataclass plus a run function."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line for ``dvpo --help``
    description: str  # the text above the options in ``dvpo <stage> --help``
    config_cls: type
    run: Callable[[Any], Any]


STAGES: dict[str, Stage] = {}


def register_stage(name: str, config_cls: type, summary: str, description: str = ""):
    """Decorator registering ``run(config)`` as the stage ``dvpo <name>``."""

    def wrap(run: Callable[[Any], Any]):
        if name in STAGES:
            raise ValueError(f"stage {name!r} is registered twice")
        STAGES[name] = Stage(name, summary, description or summary, config_cls, run)
        return run

    return wrap
