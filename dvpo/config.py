"""Typed configuration: nested dataclasses filled from a YAML file and ``key=value`` overrides.

Every stage's config is a dataclass whose fields are sections (dataclasses themselves) or
values. A value field is declared with :func:`option`, which records its help text; ``path=True``
marks a file-system path, resolved against the current directory when the config is loaded
(not against the YAML file), so a config written for the repository root works from there. Input paths
must exist once the config is loaded (:func:`check_paths`); ``output=True`` marks one the stage writes.
Supported field types: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``list[...]`` of
those, and ``X | None``. Sections may define ``validate()``, called once everything is set.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Literal, get_args, get_origin

import yaml

_NONE_WORDS = ("null", "none", "~")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class ConfigError(ValueError):
    """A config key that does not exist or a value that does not fit its field."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, path: bool = False, output: bool = False,
           default_factory: Any = dataclasses.MISSING):
    """A config field with its help text (shown by ``dvpo <stage> --help``); ``path``: a file-system path,
    which must exist unless it is an ``output`` of the stage."""
    meta = {"help": help, "path": path, "output": output}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, help: str = ""):
    """A nested config section, built with its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": help})


# --- type handling ---------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _split_optional(tp):
    """(inner type, allows None)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != len(get_args(tp)) and len(args) == 1:
            return args[0], True
    return tp, False


def type_name(tp) -> str:
    inner, optional = _split_optional(tp)
    if get_origin(inner) is Literal:
        name = "{" + ",".join(str(a) for a in get_args(inner)) + "}"
    elif get_origin(inner) is list:
        name = f"LIST[{type_name(get_args(inner)[0])}]"
    else:
        name = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(inner, getattr(inner, "__name__", str(inner)))
    return name + "|null" if optional else name


def coerce(key: str, value: Any, tp) -> Any:
    """``value`` (from YAML or a command-line string) converted to ``tp``; ConfigError naming ``key``."""
    inner, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {type_name(tp)})")
    bad = ConfigError(f"{key}: cannot use {value!r} as {type_name(tp)}")
    if get_origin(inner) is Literal:
        choices = get_args(inner)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if get_origin(inner) is list:
        item_tp = get_args(inner)[0]
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise bad
    if inner is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            raise bad from None
    if inner is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if inner is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


# --- building, overriding, validating ---------------------------------------------------------

def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _resolve_path(value):
    if value is None:
        return None
    if isinstance(value, list):
        return [_resolve_path(v) for v in value]
    return os.path.abspath(os.path.expanduser(value))


def set_value(cfg, dotted: str, value: Any) -> None:
    """Set ``cfg.<dotted>`` (e.g. ``model.hidden_size``) from a YAML or string value."""
    obj, parts = cfg, dotted.split(".")
    for depth, name in enumerate(parts):
        fields = _fields(type(obj))
        prefix = ".".join(parts[:depth])
        if name not in fields:
            raise _unknown(dotted, [f"{prefix}.{n}" if prefix else n for n in fields])
        tp = _hints(type(obj))[name]
        if depth == len(parts) - 1:
            if _is_section(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted}: a section, set its fields (e.g. {dotted}.<field>)")
                for k, v in value.items():
                    set_value(cfg, f"{dotted}.{k}", v)
                return
            new = coerce(dotted, value, tp)
            setattr(obj, name, _resolve_path(new) if fields[name].metadata.get("path") else new)
            return
        if not _is_section(tp):
            raise ConfigError(f"{dotted}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        obj = getattr(obj, name)


def validate(cfg) -> None:
    """Call ``validate()`` on every section that defines one, innermost first."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    if hasattr(cfg, "validate"):
        cfg.validate()


def check_paths(cfg, prefix: str = "") -> None:
    """Every input path field that is set names an existing file or folder; else a ConfigError naming the
    field and the path (a stage would otherwise fail deep inside a loader, e.g. transformers' hub code)."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_paths(value, key + ".")
        elif f.metadata.get("path") and not f.metadata.get("output") and value is not None:
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                if not os.path.exists(item):
                    name = f"{key}[{i}]" if isinstance(value, list) else key
                    raise ConfigError(f"{name}: no such file or folder: {item}")


def load_config(cls, path: str | os.PathLike | None = None, overrides: list[tuple[str, str]] = (), *,
                paths_must_exist: bool = True):
    """``cls()`` updated by the YAML file at ``path`` (a nested mapping), then by ``overrides``; validated,
    and with ``paths_must_exist`` its input paths checked."""
    cfg = cls()
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        for key, value in data.items():
            try:
                set_value(cfg, key, value)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
    for key, value in overrides:
        set_value(cfg, key, value)
    validate(cfg)
    if paths_must_exist:
        check_paths(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def help_text(cls, width: int = 34) -> str:
    """One line per field, grouped by section: ``--key TYPE  help (default: ...)``; the defaults are
    those of ``cls()``, so a stage's own defaults for a shared section show."""
    lines: list[str] = []

    def walk(obj, prefix: str):
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            key, value = prefix + f.name, getattr(obj, f.name)
            if _is_section(hints[f.name]):
                head = f"{key}:" + (f"  {f.metadata['help']}" if f.metadata.get("help") else "")
                lines.extend(["", head])
                walk(value, key + ".")
                continue
            shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            arg = f"  --{key} {type_name(hints[f.name])}"
            pad = " " * (width - len(arg)) if len(arg) < width else "\n" + " " * width
            lines.append(f"{arg}{pad}{f.metadata.get('help', '')} (default: {shown})")

    walk(cls(), "")
    return "\n".join(lines).lstrip("\n")
