"""The ``dvpo`` command: ``dvpo <stage> [CONFIG.yaml] [--config PATH] [KEY=VALUE ...] [--KEY VALUE ...]``.

Settings are applied in order: the stage's defaults, the YAML file, then the overrides from left to
right. Keys are dotted (``model.hidden_size``, ``train.lr``); ``--flag`` alone sets a boolean to true.
"""
from __future__ import annotations

import logging
import os
import sys
import textwrap

from .config import ConfigError, dump_yaml, help_text, load_config
from .data import DataError

_USAGE = "usage: dvpo {stage} [CONFIG.yaml] [--config PATH] [KEY=VALUE ...] [--KEY VALUE ...] [--print-config]"


def _main_help(stages) -> str:
    width = max(len(n) for n in stages) + 2
    lines = ["usage: dvpo <stage> [CONFIG.yaml] [overrides ...]", "", "Decoupled Value Policy Optimization "
             "trainer. Stages:", ""]
    lines += [f"  {name.ljust(width)}{stage.summary}" for name, stage in stages.items()]
    lines += ["", "Run 'dvpo <stage> --help' for a stage's options."]
    return "\n".join(lines)


def _stage_help(stage) -> str:
    desc = "\n\n".join(textwrap.fill(" ".join(p.split()), 100) for p in stage.description.strip().split("\n\n"))
    return "\n".join([_USAGE.format(stage=stage.name), "", desc, "",
                      "Options (YAML keys, or --key value / key=value on the command line):", "",
                      help_text(stage.config_cls)])


def parse_args(argv: list[str]) -> tuple[str | None, list[tuple[str, str]], set[str]]:
    """-> (config path, overrides in order, flags among {'help', 'print-config'})."""
    config, overrides, flags = None, [], set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            flags.add("help")
        elif arg == "--print-config":
            flags.add("print-config")
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i < len(argv) and not argv[i].startswith("--"):
                    value, i = argv[i], i + 1
                else:
                    value = "true"
            if key == "config":
                config = value
            else:
                overrides.append((key, value))
        elif "=" in arg:
            key, _, value = arg.partition("=")
            overrides.append((key, value))
        elif config is None:
            config = arg
        else:
            raise ConfigError(f"unexpected argument {arg!r}: the config file is already {config!r}")
    return config, overrides, flags


def _setup_logging() -> None:
    main_rank = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    from .stages import STAGES

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_main_help(STAGES))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"dvpo: unknown stage {name!r}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    stage = STAGES[name]
    try:
        config_path, overrides, flags = parse_args(rest)
        if "help" in flags:
            print(_stage_help(stage))
            return 0
        cfg = load_config(stage.config_cls, config_path, overrides, paths_must_exist="print-config" not in flags)
    except (ConfigError, FileNotFoundError) as err:
        print(f"dvpo {name}: error: {err}", file=sys.stderr)
        return 2
    if "print-config" in flags:
        print(dump_yaml(cfg), end="")
        return 0
    _setup_logging()
    try:
        stage.run(cfg)
    except (DataError, FileNotFoundError) as err:
        print(f"dvpo {name}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
