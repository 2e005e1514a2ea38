"""Retrieval benchmark: LRURec vs SASRec full-ranking metrics side by side, with wall time per epoch.

    python -m bench.retrieval                                  # games and beauty, both models
    python -m bench.retrieval --datasets games --models lrurec --seeds 42 43 44 --threads 1
    python -m bench.retrieval --report-only                    # just report finished runs

Seed 42 (the default) lives in runs/<dataset>/retrieval/<model>/, other seeds in <model>-s<seed>/
(the same runs `python -m train.retrieve --dataset D --model M --seed S --tag s<S>` makes).
The report goes to results/retrieval.json (per dataset × model: the command, each seed's best
epoch and test metrics, and the mean ± std over seeds) for tools and the README table.

Each (dataset, model) run lives in runs/<dataset>/retrieval/<model>/ and resumes from its last
checkpoint, so an interrupted benchmark continues where it stopped and a finished one only
re-evaluates its best model. Test metrics are over all items with the user's history masked;
"cand R@20" is the share of users whose target is in the exported top-20 (the ranker's ceiling).
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ulmrec.config import parse_config
from ulmrec.paths import atomic_write
from ulmrec.report import markdown_table
from ulmrec.retrieval import RetrievalConfig, run, run_dir

# LRURec test Recall@20 implied by the ULMRec paper (Overall = Rank × retriever Recall@20)
ANCHORS = {"games": 0.21, "beauty": 0.13}
COLUMNS = ["Recall@5", "NDCG@5", "MRR@5", "Recall@10", "NDCG@10", "MRR@10", "Recall@20", "NDCG@20"]


@dataclass
class BenchConfig:
    """Train (or resume) every retriever on every benchmark dataset and print the comparison."""
    datasets: list[str] = field(default_factory=lambda: ["games", "beauty"],
                                metadata={"help": "datasets to run"})
    models: list[str] = field(default_factory=lambda: ["lrurec", "sasrec"],
                              metadata={"help": "retrievers to compare"})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={"help": "seeds per run"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = default)"})
    report_only: bool = field(default=False, metadata={"help": "only report runs already finished"})
    out: str = field(default="results/retrieval.json", metadata={"help": "report file"})


def table(reports: list[dict]) -> str:
    head = (f"{'dataset':<8}{'model':<8}" + "".join(f"{c.replace('Recall', 'R').replace('NDCG', 'N').replace('MRR', 'M'):>8}"
                                                 for c in COLUMNS)
            + f"{'cand R@20 val/test':>20}{'epochs':>9}{'s/epoch':>9}")
    lines = [head, "-" * len(head)]
    for r in reports:
        t = r["test"]
        c = r["ranker_ceiling"]
        lines.append(f"{r['dataset']:<8}{r['model']:<8}" + "".join(f"{t[k]:>8.4f}" for k in COLUMNS)
                     + f"{c['val_Recall@20']:>11.4f} /{c['test_Recall@20']:>7.4f}"
                     + f"{str(r['best_epoch']) + '/' + str(r['epochs_trained']):>9}"
                     + f"{r['train_seconds_per_epoch']:>9.1f}")
    return "\n".join(lines)


def markdown(entries: list[dict]) -> str:
    """The docs/README table from results/retrieval.json entries (mean ± std over seeds)."""
    cols = ["Recall@5", "NDCG@5", "Recall@10", "NDCG@10", "Recall@20", "NDCG@20"]
    short = lambda c: c.replace("Recall", "R").replace("NDCG", "N")  # noqa: E731
    rows = []
    for e in entries:
        cell = (lambda c: f"{e['mean'][c]:.4f} ± {e['std'][c]:.4f}") if len(e["seeds"]) > 1 \
            else (lambda c: f"{e['mean'][c]:.4f}")
        epochs = ", ".join(str(r["best_epoch"]) for r in e["runs"])
        rows.append([e["dataset"], e["model"], len(e["seeds"])] + [cell(c) for c in cols] + [epochs])
    return markdown_table(["dataset", "model", "seeds"] + [short(c) for c in cols] + ["best epoch"],
                          rows, "llr" + "r" * (len(cols) + 1))


def seed_config(dataset: str, model: str, seed: int, threads: int = 0) -> RetrievalConfig:
    """The default settings of train.retrieve for one seed (seed 42 untagged)."""
    return replace(RetrievalConfig(), dataset=dataset, model=model, seed=seed, threads=threads,
                   tag="" if seed == 42 else f"s{seed}")


def command(rc: RetrievalConfig) -> str:
    extra = "" if rc.seed == 42 else f" --seed {rc.seed} --tag {rc.tag}"
    return f"python -m train.retrieve --dataset {rc.dataset} --model {rc.model}{extra}"


def summary(reports: list[dict], configs: list[RetrievalConfig]) -> dict:
    """One dataset × model entry of results/retrieval.json."""
    keys = [f"{m}@{k}" for k in (5, 10, 20) for m in ("Recall", "NDCG", "MRR")]
    runs = [{"seed": rc.seed, "command": command(rc), "best_epoch": r["best_epoch"],
             "epochs_trained": r["epochs_trained"], "test": {k: r["test"][k] for k in keys},
             "val_Recall@20": r["val"]["Recall@20"],
             "seconds_per_epoch": r["train_seconds_per_epoch"]} for r, rc in zip(reports, configs)]
    vals = {k: np.array([run["test"][k] for run in runs]) for k in keys}
    return {"dataset": configs[0].dataset, "model": configs[0].model,
            "command": command(configs[0]), "seeds": [rc.seed for rc in configs],
            "mean": {k: float(v.mean()) for k, v in vals.items()},
            "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in vals.items()},
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(BenchConfig, argv)
    reports, entries = [], []
    for ds in cfg.datasets:
        for model in cfg.models:
            done, configs = [], []
            for seed in cfg.seeds:
                rc = seed_config(ds, model, seed, cfg.threads)
                path = run_dir(rc) / "metrics.json"
                if cfg.report_only:
                    if not path.exists():
                        logging.warning("%s: not run yet", path.parent)
                        continue
                    done.append(json.loads(path.read_text()))
                else:
                    done.append(run(rc))
                configs.append(rc)
            reports += done
            if done:
                entries.append(summary(done, configs))
    if not reports:
        print("no finished runs")
        return 1
    print(table(reports))
    for e in entries:
        m, sd = e["mean"], e["std"]
        print(f"{e['dataset']} {e['model']} over seeds {e['seeds']}: "
              + ", ".join(f"{k} {m[k]:.4f} ± {sd[k]:.4f}" for k in ("Recall@10", "NDCG@10", "Recall@20")))
        if e["model"] == "lrurec" and e["dataset"] in ANCHORS:
            print(f"  (LRURec test Recall@20 implied by the ULMRec paper ≈ {ANCHORS[e['dataset']]:.2f})")
    out = Path(cfg.out)
    old = json.loads(out.read_text()) if out.exists() else []
    fresh = {(e["dataset"], e["model"]) for e in entries}
    merged = [e for e in old if (e["dataset"], e["model"]) not in fresh] + entries
    merged.sort(key=lambda e: (e["dataset"], e["model"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: p.write_text(json.dumps(merged, indent=1) + "\n"))
    print(f"→ {out}\n\n" + markdown(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
