"""Paired comparison of retriever runs on the same test users, from their exported top-20 lists.

    python -m bench.retrieval_paired --dataset games --runs lrurec-plain lrurec
    python -m bench.retrieval_paired --dataset games \
        --runs lrurec-plain,lrurec-plain-s43,lrurec-plain-s44 lrurec,lrurec-s43,lrurec-s44

The first run is the baseline; a comma-separated group stands for its runs' per-user metrics
averaged (several seeds of one setting against several of another: less seed noise). A
user's rank of the test target is its place in the run's `candidates.parquet` test list
(beyond 20: not retrieved), which fixes Recall@5/10/20 and NDCG@5/10/20 exactly. Each later
run is compared with the baseline user by user (95% bootstrap interval of the mean
difference); an interval that excludes 0 is a difference this many users can tell apart.
The report goes to results/retrieval-paired-<dataset>.json.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from bench.paired import bootstrap
from ulmrec.metrics import ndcg_per_user
from ulmrec.paths import REPO_ROOT, atomic_write, runs_root

METRICS = ("Recall@5", "NDCG@5", "Recall@10", "NDCG@10", "Recall@20", "NDCG@20")


def test_ranks(folder) -> pd.Series:
    """1-based rank of each test user's target in the run's top-20 (inf when not retrieved)."""
    path = folder / "candidates.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no exported candidates (train the run first)")
    test = pd.read_parquet(path, columns=["user", "split", "target", "candidates"])
    test = test[test["split"] == "test"]
    ranks = [list(c).index(t) + 1.0 if t in set(c) else np.inf
             for c, t in zip(test["candidates"], test["target"])]
    return pd.Series(ranks, index=test["user"].to_numpy(), name=folder.name)


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Each user's Recall@k and NDCG@k (k = 5, 10, 20) from 1-based ranks (inf = not ranked)."""
    out = {}
    for k in (5, 10, 20):
        out[f"Recall@{k}"] = (ranks <= k).astype(float)
        out[f"NDCG@{k}"] = ndcg_per_user(ranks, k)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--runs", nargs="+", required=True,
                    help="retriever folders under runs/<dataset>/retrieval/ (first = baseline)")
    ap.add_argument("--out", default=None, help="report (default results/retrieval-paired-<dataset>.json)")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("--runs needs a baseline and at least one run to compare with it")
    root = runs_root() / args.dataset / "retrieval"
    members = sorted({m for r in args.runs for m in r.split(",")})
    try:
        ranks = pd.concat([test_ranks(root / m) for m in members], axis=1, join="inner")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ranks.empty:
        print(f"error: {', '.join(members)} share no test user", file=sys.stderr)
        return 2
    single = {m: per_user(ranks[m].to_numpy()) for m in members}
    per = {r: {k: np.mean([single[m][k] for m in r.split(",")], axis=0) for k in METRICS}
           for r in args.runs}
    base = args.runs[0]
    report = {"dataset": args.dataset, "baseline": base, "test_users": len(ranks),
              "command": "python -m bench.retrieval_paired " + " ".join(argv or sys.argv[1:]),
              "metrics": {r: {m: float(per[r][m].mean()) for m in METRICS} for r in args.runs},
              "members": {m: {k: float(single[m][k].mean()) for k in METRICS} for m in members},
              "paired": {}}
    print(f"{args.dataset}: {len(ranks)} test users, each run against {base}")
    for r in args.runs:
        if "," in r:
            sd = {k: np.std([report["members"][m][k] for m in r.split(",")], ddof=1) for k in METRICS}
            print(f"{r}: " + ", ".join(f"{k} {report['metrics'][r][k]:.4f} ± {sd[k]:.4f}" for k in METRICS))
    for r in args.runs[1:]:
        report["paired"][r] = {}
        for m in METRICS:
            d = per[r][m] - per[base][m]
            lo, hi = bootstrap(d)
            report["paired"][r][m] = {"mean": float(d.mean()), "lo": lo, "hi": hi}
        print(f"{r}\n  " + "  ".join(
            f"{m} {per[r][m].mean():.4f} ({p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}])"
            for m, p in report["paired"][r].items() if m in ("Recall@10", "NDCG@10", "Recall@20")))
    out = REPO_ROOT / (args.out or f"results/retrieval-paired-{args.dataset}.json")
    atomic_write(out, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    print(f"→ {args.out or out.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
