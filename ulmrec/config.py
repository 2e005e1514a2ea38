"""Dataclass configs parsed from the command line and/or a YAML file.

Every stage of the pipeline describes its settings as one dataclass. `parse_config`
turns the fields into CLI flags (bools become --flag / --no-flag, never `type=bool`),
lets `--config file.yaml` provide defaults, and lets explicit flags win over the file.
A field's metadata may name its flag (`flag`), hidden old spellings (`aliases`) and
its `metavar`.

A missing or unreadable YAML file is a usage error like an unknown flag: one line on
stderr, exit status 2, no traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A --config file that cannot be used; the message names it (and the line)."""


# The program name usage lines show; `python -m train <command>` sets it for the command.
_prog: str | None = None


@contextlib.contextmanager
def prog_name(name: str):
    """Within the block, parsers call the program `name` (e.g. 'python -m train run')."""
    global _prog
    old, _prog = _prog, name
    try:
        yield
    finally:
        _prog = old


def _default_prog() -> str | None:
    """'python -m train.data' for a stage run as a module (argparse would say 'data.py')."""
    if _prog:
        return _prog
    script = Path(sys.argv[0] if sys.argv and sys.argv[0] else "")
    if script.suffix == ".py" and script.parent.name == "train" and script.stem != "__main__":
        return f"python -m train.{script.stem}"
    return None  # argparse's own choice


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    return tp, origin


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_default_prog(), description=description or cls.__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with field values")
    for f in dataclasses.fields(cls):
        tp, origin = _field_type(cls, f)
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            kwargs = dict(action=argparse.BooleanOptionalAction)
        elif origin in (list, tuple):
            (inner,) = set(typing.get_args(tp)) - {Ellipsis}
            kwargs = dict(type=inner, nargs=f.metadata.get("nargs", "+"))
        else:
            kwargs = dict(type=tp if tp in (int, float, str) else str,
                          choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))
        parser.add_argument(flag, dest=f.name, default=None, help=help_text, **kwargs)
        for alias in f.metadata.get("aliases", ()):  # old spellings keep working, unlisted
            parser.add_argument(alias, dest=f.name, default=None, help=argparse.SUPPRESS, **kwargs)
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


def check_choices(cls: type, values: dict) -> None:
    """ConfigError for a value outside its field's `choices`: argparse checks the flags, this
    checks what came from YAML (a list field, each of its items)."""
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        v = values.get(f.name)
        if choices is None or v is None:
            continue
        for item in v if isinstance(v, (list, tuple)) else [v]:
            if item not in choices:
                raise ConfigError(f"{f.name}: {item!r} is not one of {', '.join(map(str, choices))}")


def load_yaml(path: Path) -> dict:
    """A YAML mapping; ConfigError (naming the file, and the line where YAML says) if not."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    return data


def parse_config(cls: type[T], argv: list[str] | None = None, section: str | None = None) -> T:
    """CLI flags > YAML (`--config`, optionally one `section` of it) > dataclass defaults."""
    parser = build_parser(cls)
    args = parser.parse_args(argv)
    values: dict = {}
    if args.config is not None:
        try:
            data = load_yaml(args.config)
        except ConfigError as e:
            parser.exit(2, f"error: {e}\n")
        if section is not None and section in data:
            data = data[section]
            if not isinstance(data, dict):
                parser.exit(2, f"error: {args.config}: section '{section}' is not a mapping\n")
        names = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k in data if k not in names and not isinstance(data[k], dict))
        if ignored:  # shared pipeline files hold other stages' keys too; say which were skipped
            logging.getLogger(__name__).info("%s: keys not used by %s: %s", args.config,
                                             cls.__name__, ", ".join(ignored))
        values.update({k: v for k, v in data.items() if k in names})
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    try:
        check_choices(cls, values)
    except ConfigError as e:
        parser.exit(2, f"error: {args.config}: {e}\n")
    return from_dict(cls, values)
