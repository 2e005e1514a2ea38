"""The pipeline's machinery: sections from one YAML, a key per stage, the plan (run, skip,
resume), the state file, and running each stage in this process as `run(cfg)`.

The stage graph itself (which stages, what each leaves, which keys they share) is
train/pipeline.py's; `python -m train run` is its command line.

A stage's key hashes its section, the keys of the stages before it and the dataset
fingerprint; runs/<dataset>/pipeline/state.json records it with the outputs the stage left. A
stage is skipped when its key matches, it finished and its outputs still exist; once a stage
runs, every later one runs too, since they read its outputs. Only a run the pipeline started
with the same key and did not finish resumes (each stage resumes by itself); any other run
starts fresh (`resume: false` where the stage has it), so a changed config never continues a
different model. Each stage's section is also written to runs/<dataset>/pipeline/<stage>.yaml,
as a record of what ran (`python -m train.<stage> --config` that file reruns it alone).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, check_choices, flat_fields, from_dict
from .data import DataError  # bad input, named on its line: logged without a traceback
from .data import DataConfig
from .data.dataset import fingerprint, resolve_source
from .paths import atomic_write, runs_root

log = logging.getLogger("ulmrec.pipeline")


class PipelineError(ValueError):
    """A pipeline YAML or command line that cannot run; raised before any stage starts."""


class StageError(RuntimeError):
    """A stage that failed or did not leave its outputs."""


@dataclass(frozen=True)
class Stage:
    name: str
    module: str       # imported only when needed: most stages pull in torch / transformers
    config: str       # the stage's @dataclass config, by name inside `module`
    outputs: Callable[[Any], list[Path]]  # what a finished run leaves, from its config
    runner: str = "run"   # the function of `module` that runs the stage: runner(cfg) → summary


@dataclass
class PipelineConfig:
    """Run the pipeline stages of a YAML file in order (`--config` names the file)."""
    dataset: str = field(default="", metadata={"help": "overrides the YAML's top-level dataset"})
    seed: int | None = field(default=None, metadata={"help": "overrides the YAML's top-level seed"})
    from_stage: str | None = field(default=None, metadata={
        "flag": "--from", "aliases": ("--from-stage",), "metavar": "STAGE",
        "help": "force this stage and every later one to rerun"})
    only: str | None = field(default=None, metadata={"metavar": "STAGE",
                                                     "help": "run this stage alone, forced"})
    dry_run: bool = field(default=False, metadata={"help": "print what would run or skip, and why"})


# how a stage runs, not what it makes: changing them must not throw a finished run away
NOT_IN_KEY = {"resume", "threads", "stop_after"}
TOP_LEVEL = {"dataset", "seed"}


def dataset_name(dataset: str) -> str:
    """The folder name under runs/ (a named source, or the name of a data folder)."""
    return resolve_source(DataConfig(dataset=dataset))[0]


def load_stage(stage: Stage) -> tuple[Callable, type]:
    """(runner, config dataclass) of a stage, imported now."""
    try:
        module = importlib.import_module(stage.module)
    except ModuleNotFoundError as e:
        if e.name != stage.module:
            raise
        raise PipelineError(f"stage {stage.name}: module {stage.module} not found") from None
    return getattr(module, stage.runner), getattr(module, stage.config)


def build_sections(spec: dict, cfg: PipelineConfig, stages, config_path: Path | None,
                   shares=(), link: Callable[[dict, str, str], None] | None = None) -> dict:
    """stage → its full section (shared keys filled in), None where the stage does not run.
    Every unknown stage or key is an error here, before anything runs. `shares`: (stage,
    earlier stage, keys not to take) — a stage takes every key it shares with the earlier
    section unless it sets it itself, the first pair that sets a key winning;
    `link(sections, dataset, phase)` fills in what the graph ties together (run names,
    folders), once before the shared keys ("before") and once after them ("after")."""
    names = [s.name for s in stages]
    unknown = sorted(set(spec) - set(names) - TOP_LEVEL)
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(unknown)} in the pipeline YAML; "
                            f"stages: {', '.join(names)}; top-level keys: {', '.join(sorted(TOP_LEVEL))}")
    dataset = cfg.dataset or spec.get("dataset")
    if not dataset:
        raise PipelineError("no dataset: set `dataset:` at the top of the YAML (or pass --dataset)")
    seed = cfg.seed if cfg.seed is not None else spec.get("seed")
    sections: dict[str, dict | None] = {}
    fields: dict[str, set[str]] = {}
    for stage in stages:
        if stage.name not in spec:  # no section at all: the stage is not part of this pipeline
            sections[stage.name] = None
            continue
        raw = spec[stage.name] if spec[stage.name] is not None else {}  # `index:` alone: defaults
        if not isinstance(raw, dict):
            raise PipelineError(f"stage {stage.name}: expected a mapping of its config keys, got {raw!r}")
        section = dict(raw)
        skip = section.pop("skip", False)
        try:
            _, config_cls = load_stage(stage)
        except PipelineError:
            if skip:  # a stage that does not run may be absent from this checkout
                sections[stage.name] = None
                continue
            raise
        fields[stage.name] = set(flat_fields(config_cls))   # composed configs' keys flat
        bad = sorted(set(section) - fields[stage.name])
        if bad:
            raise PipelineError(f"stage {stage.name}: unknown key(s) {', '.join(bad)} "
                                f"({config_cls.__name__} has: {', '.join(sorted(fields[stage.name]))})")
        try:
            check_choices(config_cls, section)
        except ConfigError as e:
            raise PipelineError(f"stage {stage.name}: {e}") from None
        if section.get("dataset", dataset) != dataset:
            raise PipelineError(f"stage {stage.name}: dataset {section['dataset']!r} differs from the "
                                f"pipeline's {dataset!r}; set it once at the top of the YAML")
        if skip:
            sections[stage.name] = None
            continue
        section["dataset"] = dataset
        if seed is not None and "seed" in fields[stage.name]:
            section.setdefault("seed", seed)
        if config_path is not None and "config_file" in fields[stage.name]:
            section.setdefault("config_file", str(Path(config_path).resolve()))
        sections[stage.name] = section
    if link is not None:
        link(sections, dataset, "before")
    for dst, src, keep_out in shares:
        if sections.get(dst) is not None and sections.get(src) is not None:
            for k, v in sections[src].items():
                if k in fields[dst] and k not in keep_out:
                    sections[dst].setdefault(k, v)
    if link is not None:
        link(sections, dataset, "after")
    # YAML → JSON-able plain values (tuples would not survive yaml.safe_dump)
    return {k: json.loads(json.dumps(v)) for k, v in sections.items()}


def own_run_name(sections: dict, stage: str, *others: str) -> None:
    """Two stages writing one runs/<dataset>/finetune/<run_name> would overwrite each other."""
    name = sections[stage]["run_name"]
    for other in others:
        if sections.get(other) is not None and sections[other].get("run_name", "ulmrec") == name:
            raise PipelineError(f"stage {stage}: run_name {name!r} is the {other} stage's; "
                                f"give the {stage} run its own")


def data_fingerprint(sections: dict, dataset: str) -> tuple[str, str]:
    """(runs/ folder name, fingerprint of the input files and processing settings)."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    values = sections.get("data") or {"dataset": dataset}
    cfg = DataConfig(**{k: v for k, v in values.items() if k in known})
    try:
        name, kind, files = resolve_source(cfg)
        return name, fingerprint(cfg, kind, files)
    except DataError as e:
        raise PipelineError(str(e)) from None


def _keyed(section: dict | None) -> dict | None:
    return None if section is None else {k: v for k, v in section.items() if k not in NOT_IN_KEY}


def stage_keys(sections: dict, fingerprint: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for name, section in sections.items():
        blob = json.dumps({"stage": name, "section": _keyed(section), "before": list(keys.values()),
                           "data": fingerprint}, sort_keys=True, default=str)
        keys[name] = hashlib.sha256(blob.encode()).hexdigest()
    return keys


def plan(sections: dict, keys: dict, state: dict, cfg: PipelineConfig) -> dict[str, dict]:
    """stage → {"action": run | skip | off, "why": ..., "resume": bool}."""
    names = list(sections)
    for flag, value in (("--from", cfg.from_stage), ("--only", cfg.only)):
        if value is not None and value not in names:
            raise PipelineError(f"{flag} {value}: unknown stage; stages: {', '.join(names)}")
        if value is not None and sections[value] is None:
            raise PipelineError(f"{flag} {value}: that stage has no section (or skip: true) in the YAML")
    if cfg.from_stage and cfg.only:
        raise PipelineError("--from and --only do not combine")
    start = names.index(cfg.from_stage) if cfg.from_stage else len(names)
    out, upstream_ran = {}, False
    for i, name in enumerate(names):
        prev = state.get(name) or {}
        if sections[name] is None:
            out[name] = {"action": "off", "why": "no section or skip: true"}
            continue
        if cfg.only and name != cfg.only:
            out[name] = {"action": "off", "why": f"not selected (--only {cfg.only})"}
            continue
        forced = i >= start or name == cfg.only
        why = None
        if forced:
            why = f"forced (--from {cfg.from_stage})" if cfg.from_stage else "forced (--only)"
        elif not prev:
            why = "no previous run"
        elif prev.get("key") != keys[name]:
            changed = _keyed(prev.get("section")) != _keyed(sections[name])
            why = "its section changed" if changed else "an earlier stage or the data changed"
        elif upstream_ran:
            why = "an earlier stage runs"
        elif prev.get("status") != "done":
            why = f"{prev.get('status')} last time"  # ', resumes' follows
        else:
            missing = [p for p in prev.get("outputs", []) if not Path(p).exists()]
            if missing:
                why = f"output missing: {missing[0]}"
        if why is None:
            out[name] = {"action": "skip", "why": "current"}
            continue
        # only a run this pipeline began with the same key, on the same upstream outputs,
        # continues; anything else may be another config's half-trained model
        resume = (not forced and not upstream_ran and prev.get("key") == keys[name]
                  and prev.get("status") in ("running", "failed"))
        upstream_ran = True
        out[name] = {"action": "run", "why": why, "resume": resume}
    return out


def read_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("stages", {})
    except (json.JSONDecodeError, AttributeError) as e:
        log.warning("%s unreadable (%s): every stage counts as never run", path, e)
        return {}


def write_state(path: Path, stages: dict, header: dict) -> None:
    payload = json.dumps({**header, "stages": stages}, indent=1, default=str)
    atomic_write(path, lambda p: p.write_text(payload))


def run_stage(stage: Stage, section: dict, folder: Path, resume: bool) -> list[Path]:
    """Run one stage in this process: its config from the section (written beside the state
    as a record), `resume` off unless this run continues; its outputs, or StageError."""
    runner, config_cls = load_stage(stage)
    cfg_file = folder / f"{stage.name}.yaml"
    atomic_write(cfg_file, lambda p: p.write_text(yaml.safe_dump(section, sort_keys=False)))
    cfg = from_dict(config_cls, section)
    if not resume and "resume" in {f.name for f in dataclasses.fields(config_cls)}:
        cfg = dataclasses.replace(cfg, resume=False)
    if "command" in inspect.signature(runner).parameters:
        # a stage that records how it was run (evaluate's tables) names the stage YAML it read
        runner(cfg, command=f"python -m {stage.module.replace('ulmrec.', 'train.').split('.run')[0]}"
                            f" --config {cfg_file}")
    else:
        runner(cfg)
    outputs = stage.outputs(cfg)
    missing = [p for p in outputs if not Path(p).exists()]
    if not outputs or missing:
        raise StageError(f"stage {stage.name}: finished but left no {missing[0] if missing else 'outputs'}"
                         f" (stopped early on purpose? rerun to resume)")
    return [Path(p).resolve() for p in outputs]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: PipelineConfig, spec: dict, stages, config_path: Path | None = None, shares=(),
        link=None) -> int:
    """Plan and run the pipeline `spec` (a parsed YAML); 0 when every selected stage is done."""
    sections = build_sections(spec, cfg, stages, config_path, shares, link)
    name, fingerprint = data_fingerprint(sections, cfg.dataset or spec["dataset"])
    keys = stage_keys(sections, fingerprint)
    folder = runs_root() / name / "pipeline"
    state_path = folder / "state.json"
    state = read_state(state_path)
    steps = plan(sections, keys, state, cfg)

    if cfg.dry_run:
        print(f"pipeline {config_path or ''} on {name} (data {fingerprint}), state {state_path}:")
        for stage, p in steps.items():
            print(f"  {stage:<12} {p['action']:<5} {p['why']}{', resumes' if p.get('resume') else ''}")
        return 0

    header = {"config": str(config_path) if config_path else None, "dataset": name,
              "data_fingerprint": fingerprint}
    rows, failed = [], False
    for stage in stages:
        p = steps[stage.name]
        if p["action"] != "run" or failed:
            status = {"skip": "skipped (current)", "off": "off"}.get(p["action"], "not run")
            if p["action"] == "skip":
                log.info("stage %s: skipped (current)", stage.name)
            rows.append((stage.name, status, None))
            continue
        log.info("stage %s: running (%s%s)", stage.name, p["why"], ", resumes" if p["resume"] else "")
        entry = {"key": keys[stage.name], "section": sections[stage.name], "status": "running",
                 "started_at": _now()}
        state[stage.name] = entry
        write_state(state_path, state, header)
        t0 = time.time()
        try:
            outputs = run_stage(stage, sections[stage.name], folder, p["resume"])
        except Exception as e:  # any stage error ends the pipeline, with its summary
            seconds = time.time() - t0
            log.error("stage %s: failed after %.1f s: %s", stage.name, seconds, e,
                      exc_info=not isinstance(e, (StageError, PipelineError, DataError)))
            state[stage.name] = {**entry, "status": "failed", "error": str(e)[:500]}
            write_state(state_path, state, header)
            rows.append((stage.name, "failed", seconds))
            failed = True
            continue
        seconds = time.time() - t0
        state[stage.name] = {**entry, "status": "done", "finished_at": _now(),
                             "seconds": round(seconds, 1), "outputs": [str(o) for o in outputs]}
        write_state(state_path, state, header)
        log.info("stage %s: done in %.1f s", stage.name, seconds)
        rows.append((stage.name, "done", seconds))

    print(f"\n{'stage':<12} {'status':<18} {'seconds':>9}")
    for stage, status, seconds in rows:
        print(f"{stage:<12} {status:<18} {'-' if seconds is None else f'{seconds:.1f}':>9}")
    return 1 if failed else 0
