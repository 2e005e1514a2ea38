"""Dataclass configs parsed from the command line and/or a YAML file.

Every stage of the pipeline describes its settings as one dataclass. `parse_config`
turns the fields into CLI flags (bools become --flag / --no-flag, never `type=bool`),
lets `--config file.yaml` provide defaults, and lets explicit flags win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    return tp, origin


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with field values")
    for f in dataclasses.fields(cls):
        tp, origin = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif origin in (list, tuple):
            (inner,) = set(typing.get_args(tp)) - {Ellipsis}
            parser.add_argument(flag, dest=f.name, type=inner, nargs="+", default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=tp if tp in (int, float, str) else str,
                                default=None, help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def from_dict(cls: type[T], values: dict, known_only: bool = False) -> T:
    """cls from a dict (lists become tuples where the field is a tuple); unknown keys are an
    error, or dropped with known_only (a saved config read back by a narrower class)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and not known_only:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        tp, origin = _field_type(cls, f)
        if origin is tuple and isinstance(v, list):
            v = tuple(v)
        out[f.name] = v
    return cls(**out)


def load_yaml(path: Path) -> dict:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of field: value")
    return data


def parse_config(cls: type[T], argv: list[str] | None = None, section: str | None = None) -> T:
    """CLI flags > YAML (`--config`, optionally one `section` of it) > dataclass defaults."""
    args = build_parser(cls).parse_args(argv)
    values: dict = {}
    if args.config is not None:
        data = load_yaml(args.config)
        if section is not None and section in data:
            data = data[section]
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in data if k not in names and not isinstance(data[k], dict))
        if ignored:  # shared pipeline files hold other stages' keys too; say which were skipped
            logging.getLogger(__name__).info("%s: keys not used by %s: %s", args.config,
                                             cls.__name__, ", ".join(ignored))
        values.update({k: v for k, v in data.items() if k in names})
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return from_dict(cls, values)
