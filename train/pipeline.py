"""Run the whole pipeline from one YAML, skipping every stage whose outputs are current.

    python -m train run --config configs/demo.yaml                   # run, resume or skip
    python -m train run --config configs/demo.yaml --dry-run         # what would run, and why
    python -m train run --config configs/demo.yaml --from finetune   # redo finetune and after
    python -m train run --config configs/demo.yaml --only evaluate   # this stage alone, forced

Stages, in order: data → retrieve → index → preferences → finetune → refine → evaluate →
lcrec → decode → export (lcrec, the LC-Rec baseline of train/lcrec.py, is optional: with a
section, the bundle carries it as the app's whole-catalogue mode; refine, also optional, is a
second train.finetune run that starts from the finetune run's best adapter (e.g. next-item
prompts only after the six-task mix, docs/ranker.md), takes every finetune key it does not set
itself, is named `<finetune run>-refine` by default, and is the run evaluate and export then
take; decode, also optional, is a train.finetune run of its own, by default `run_name: decode`,
whose index → preference adapter the bundle carries as decode/ for the app's decode panel,
docs/decode.md).
The YAML holds `dataset:` (and `seed:`) at the top and one mapping per stage with that
stage's own config keys; a stage without a section, or with `skip: true`, does not run.
`dataset` reaches every stage and `seed` every stage that has one; evaluate takes the ranker
keys it shares with finetune (or refine), export takes that run's run_name and evaluate's results_dir
(and the pipeline YAML as its config_file) and lcrec's run folder, unless a section sets
them itself.

This file is the stage graph: which stages, in what order, what each leaves and which keys
they share. Each stage runs in this process as its library function `run(cfg)` (the same one
its `python -m train.<stage>` command calls); keys, plan, state and resuming are
ulmrec.pipeline's.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ulmrec.config import ConfigError, from_dict, load_yaml, parse_config
from ulmrec.paths import cache_root, runs_root
from ulmrec.pipeline import (PipelineConfig, PipelineError, Stage, StageError,  # noqa: F401  (its API)
                             own_run_name, dataset_name, plan, stage_keys)
from ulmrec.pipeline import build_sections as _build_sections
from ulmrec.pipeline import run as _run

log = logging.getLogger("train.pipeline")


# ---------------------------------------------------------------- where each stage leaves its outputs

def _data_outputs(cfg) -> list[Path]:
    from ulmrec.data.dataset import fingerprint, resolve_source
    name, kind, files = resolve_source(cfg)
    return [cache_root() / "data" / f"{name}-{fingerprint(cfg, kind, files)}" / "info.json"]


def _retrieve_outputs(cfg) -> list[Path]:
    from ulmrec.retrieval.trainer import run_dir
    return [run_dir(cfg) / "candidates.parquet", run_dir(cfg) / "metrics.json"]


def _index_outputs(cfg) -> list[Path]:
    out = runs_root() / dataset_name(cfg.dataset) / cfg.run_name()
    return [out / "user_index.parquet", out / "summary.json"]


def _preferences_outputs(cfg) -> list[Path]:
    out = Path(cfg.out_dir) if cfg.out_dir else runs_root() / dataset_name(cfg.dataset) / "preferences"
    if cfg.backend != "auto":
        return [out / f"{cfg.task}-{cfg.backend}.json"]
    # 'auto' picks its backend at run time: the file it wrote is the newest one
    return sorted(out.glob(f"{cfg.task}-*.json"), key=lambda p: p.stat().st_mtime)[-1:]


def _finetune_outputs(cfg) -> list[Path]:
    from ulmrec.finetune import run_dir
    return [run_dir(cfg) / "best", run_dir(cfg) / "train_summary.json"]


def _decode_outputs(cfg) -> list[Path]:
    from ulmrec.finetune import run_dir
    return [run_dir(cfg) / "last", run_dir(cfg) / "train_summary.json"]


def _evaluate_outputs(cfg) -> list[Path]:
    from ulmrec.evaluate import results_stem
    stem = results_stem(cfg.results_dir, cfg.dataset)
    return [stem.with_suffix(".json"), stem.with_suffix(".md")]


def _lcrec_outputs(cfg) -> list[Path]:
    from ulmrec.lcrec.run import outputs
    return outputs(cfg, dataset_name(cfg.dataset))


def _export_outputs(cfg) -> list[Path]:
    from ulmrec.export import bundle_dir
    out = bundle_dir(cfg, dataset_name(cfg.dataset))
    return [out / "bundle.json"]


STAGES = (
    Stage("data", "ulmrec.data", "DataConfig", _data_outputs, "load_dataset"),
    Stage("retrieve", "ulmrec.retrieval", "RetrievalConfig", _retrieve_outputs),
    Stage("index", "ulmrec.indexing.build", "IndexConfig", _index_outputs),
    Stage("preferences", "ulmrec.preferences.run", "PreferenceConfig", _preferences_outputs),
    Stage("finetune", "ulmrec.finetune", "FinetuneConfig", _finetune_outputs, "train"),
    Stage("refine", "ulmrec.finetune", "FinetuneConfig", _finetune_outputs, "train"),
    Stage("evaluate", "ulmrec.evaluate", "EvaluateConfig", _evaluate_outputs),
    Stage("lcrec", "ulmrec.lcrec.run", "LcRecConfig", _lcrec_outputs),
    # after the ranker's stages: a changed decode run re-exports, nothing more
    Stage("decode", "ulmrec.finetune", "FinetuneConfig", _decode_outputs, "train"),
    Stage("export", "ulmrec.export", "ExportConfig", _export_outputs, "export"),
)

# (stage, earlier stage, keys not to take): a stage takes every key it shares with the earlier
# section unless it sets it itself; the first pair that sets a key wins. refine continues
# finetune's run under its own name and folder; evaluate builds the ranker's prompts
# (batch_size means something else there); export bundles the ranker run (refine's when there
# is one) and evaluate's results.
SHARES = (("refine", "finetune", {"run_name", "init_from", "output_dir"}),
          ("evaluate", "refine", {"batch_size"}), ("evaluate", "finetune", {"batch_size"}),
          ("export", "refine", set()), ("export", "finetune", set()), ("export", "evaluate", set()))

def link(sections: dict, dataset: str, phase: str) -> None:
    """What this graph ties together: refine continues finetune's run (its best adapter, its
    own run name); export carries lcrec's folder and the decode run."""
    if phase == "before" and sections.get("refine") is not None:
        if sections.get("finetune") is None:
            raise PipelineError("stage refine: it continues the finetune stage's run; "
                                "give the YAML a finetune section")
        from ulmrec.finetune import FinetuneConfig, run_dir
        first = sections["finetune"].get("run_name", "ulmrec")
        sections["refine"].setdefault("run_name", f"{first}-refine")
        own_run_name(sections, "refine", "finetune")
        sections["refine"].setdefault(
            "init_from", str(run_dir(from_dict(FinetuneConfig, sections["finetune"])) / "best"))
    if phase != "after":
        return
    if sections.get("lcrec") is not None and sections.get("export") is not None:
        from ulmrec.lcrec.run import LcRecConfig, model_dir
        lcrec = from_dict(LcRecConfig, sections["lcrec"])
        sections["export"].setdefault("lcrec", str(model_dir(lcrec, dataset_name(dataset))))
    if sections.get("decode") is not None:
        sections["decode"].setdefault("run_name", "decode")
        own_run_name(sections, "decode", "finetune", "refine")
        if sections.get("export") is not None:
            sections["export"].setdefault("decode", sections["decode"]["run_name"])


def build_sections(spec: dict, cfg: PipelineConfig, stages=STAGES, config_path: Path | None = None) -> dict:
    """This graph's sections of a pipeline YAML (ulmrec.pipeline.build_sections)."""
    return _build_sections(spec, cfg, stages, config_path, SHARES, link)


def run(cfg: PipelineConfig, spec: dict, stages=STAGES, config_path: Path | None = None) -> int:
    """Plan and run this graph on a parsed pipeline YAML; 0 when every selected stage is done."""
    return _run(cfg, spec, stages, config_path, SHARES, link)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config is the pipeline file: parse_config also reads its top-level dataset / seed
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    config_path = pre.parse_known_args(argv)[0].config
    cfg = parse_config(PipelineConfig, argv)  # a bad --config file exits 2 here, on one line
    if config_path is None:
        print("error: --config <pipeline.yaml> is required", file=sys.stderr)
        return 2
    try:
        spec = load_yaml(config_path)
        return run(cfg, spec, STAGES, config_path)
    except (PipelineError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
