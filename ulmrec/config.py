"""Dataclass configs parsed from the command line and/or a YAML file.

Every stage of the pipeline describes its settings as one dataclass. `parse_config`
turns the fields into CLI flags (bools become --flag / --no-flag, never `type=bool`),
lets `--config file.yaml` provide defaults, and lets explicit flags win over the file.
A field's metadata may name its flag (`flag`), hidden old spellings (`aliases`) and
its `metavar`.

A field whose type is itself a config dataclass composes it (LC-Rec's config holds an
IndexConfig and a RankerConfig instead of copying their fields). Its fields appear flat,
as `<prefix><name>` flags and YAML keys (metadata `prefix`, default the field's name + "_";
`fields` limits which of them the stage exposes, the rest keep the default), and a saved
config is written flat too (`flat_dict`), so that a narrower reader still finds them.

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


def _composed(cls: type, f: dataclasses.Field) -> type | None:
    """The config dataclass a field composes, else None."""
    tp, _ = _field_type(cls, f)
    return tp if dataclasses.is_dataclass(tp) else None


def flat_fields(cls: type) -> dict[str, tuple[type, dataclasses.Field, str | None]]:
    """Flat key → (the class that defines it, its field, the composing field's name or None):
    the names flags and YAML use, composed configs' fields under their prefix."""
    out = {}
    own = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        sub = _composed(cls, f)
        if sub is None:
            out[f.name] = (cls, f, None)
            continue
        prefix = f.metadata.get("prefix", f.name + "_")
        inner = {g.name: g for g in dataclasses.fields(sub)}
        for name in f.metadata.get("fields") or tuple(inner):
            if prefix + name in out or prefix + name in own:
                raise TypeError(f"{cls.__name__}: {f.name}.{name} and another field are both "
                                f"'{prefix + name}'")
            out[prefix + name] = (sub, inner[name], f.name)
    return out


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_default_prog(), description=description or cls.__doc__)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with field values")
    for key, (owner, f, outer) in flat_fields(cls).items():
        tp, origin = _field_type(owner, f)
        flag = (f.metadata.get("flag") if outer is None else None) or "--" + key.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if tp is bool:
            kwargs = dict(action=argparse.BooleanOptionalAction)
        elif origin in (list, tuple):
            (inner,) = set(typing.get_args(tp)) - {Ellipsis}
            kwargs = dict(type=inner, nargs=f.metadata.get("nargs", "+"))
        else:
            kwargs = dict(type=tp if tp in (int, float, str) else str,
                          choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"))
        parser.add_argument(flag, dest=key, default=None, help=help_text, **kwargs)
        for alias in f.metadata.get("aliases", ()) if outer is None else ():  # old spellings, unlisted
            parser.add_argument(alias, dest=key, default=None, help=argparse.SUPPRESS, **kwargs)
    return parser


def _value(cls: type, f: dataclasses.Field, v):
    _, origin = _field_type(cls, f)
    return tuple(v) if origin is tuple and isinstance(v, list) else v


def from_dict(cls: type[T], values: dict, known_only: bool = False) -> T:
    """cls from a dict of flat keys (a composed config's fields under their prefix, or a
    mapping under the field's own name); lists become tuples where the field is a tuple.
    Unknown keys are an error, or dropped with known_only (a saved config read back by a
    narrower class)."""
    flat = flat_fields(cls)
    direct = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in flat and k not in direct)
    if unknown and not known_only:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(flat))}")
    out, parts = {}, {}
    for key, v in values.items():
        if key in direct and _composed(cls, direct[key]) is not None:
            if isinstance(v, dict):                          # a nested mapping
                parts.setdefault(key, {}).update(v)
            else:                                            # an instance
                out[key] = v
        elif key in flat:
            owner, f, outer = flat[key]
            if outer is None:
                out[key] = _value(owner, f, v)
            else:
                parts.setdefault(outer, {})[f.name] = v
    for name, given in parts.items():
        f = direct[name]
        base = out.get(name) or (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                 else f.default)
        sub = _composed(cls, f)
        inner = {g.name: g for g in dataclasses.fields(sub)}
        bad = sorted(set(given) - set(inner))
        if bad and not known_only:
            raise ValueError(f"unknown {sub.__name__} field(s) in {name}: {', '.join(bad)}")
        out[name] = dataclasses.replace(base, **{k: _value(sub, inner[k], v)
                                                 for k, v in given.items() if k in inner})
    return cls(**out)


def flat_dict(cfg) -> dict:
    """asdict with the composed configs' exposed fields flat, under their prefix (how a
    config is saved: from_dict reads it back, and a narrower class finds its keys)."""
    return {key: getattr(cfg, f.name) if outer is None else getattr(getattr(cfg, outer), f.name)
            for key, (_, f, outer) in flat_fields(type(cfg)).items()}


def check_choices(cls: type, values: dict) -> None:
    """ConfigError for a value outside its field's `choices`: argparse checks the flags, this
    checks what came from YAML (a list field, each of its items)."""
    for key, (_, f, _) in flat_fields(cls).items():
        choices = f.metadata.get("choices")
        v = values.get(key)
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
        names = set(flat_fields(cls)) | {f.name for f in dataclasses.fields(cls)}
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
