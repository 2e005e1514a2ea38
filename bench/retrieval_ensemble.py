"""Seed ensembling of a retriever, paired against its single seed on the same test users.

    python -m bench.retrieval_ensemble --dataset games --model lrurec --seeds 42 43 44 --export

Averages the members' log-probabilities over the catalogue, evaluates full ranking on val and
test, compares each test user's Recall@20 / NDCG@10 with the seed-42 model (95% bootstrap CI),
and with --export writes runs/<dataset>/retrieval/<model>-ens/ (candidates.parquet for the
train/val/test splits, metrics.json), usable as `--retriever <model>-ens` by the ranker.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from bench.paired import bootstrap
from bench.retrieval import seed_config
from bench.retrieval_paired import per_user
from ulmrec.data import load_dataset
from ulmrec.paths import REPO_ROOT, atomic_write, runs_root
from ulmrec.retrieval.data import eval_histories
from ulmrec.retrieval.ensemble import load_ensemble
from ulmrec.retrieval.evaluate import full_rank
from ulmrec.retrieval.trainer import rank_splits, run_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--model", default="lrurec")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export", action="store_true", help="write <model>-ens candidates")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [seed_config(args.dataset, args.model, s) for s in args.seeds]
    folders = [run_dir(c) for c in configs]
    missing = [str(f) for f in folders if not (f / "model.safetensors").exists()]
    if missing:
        print(f"error: not trained yet: {', '.join(missing)}", file=sys.stderr)
        return 2
    ds = load_dataset(args.dataset)
    ens, _ = load_ensemble(folders)
    single = ens.members[0]                  # the first seed alone, already loaded
    cfg = configs[0]
    users, hist, targets = eval_histories(ds, "test")
    per = {}
    for name, model in (("single", single), ("ensemble", ens)):
        ranks = full_rank(model, hist, targets, cfg.max_len, cfg.eval_batch_size, 20, desc=name)["ranks"]
        per[name] = per_user(ranks)
    report = {"dataset": args.dataset, "model": args.model, "seeds": args.seeds,
              "command": "python -m bench.retrieval_ensemble " + " ".join(argv or sys.argv[1:]),
              "test_users": len(users), "single_seed": args.seeds[0], "metrics": {}, "paired": {}}
    for k in ("Recall@10", "NDCG@10", "Recall@20"):
        d = per["ensemble"][k] - per["single"][k]
        lo, hi = bootstrap(d)
        report["metrics"][k] = {"single": float(per["single"][k].mean()),
                                "ensemble": float(per["ensemble"][k].mean())}
        report["paired"][k] = {"mean": float(d.mean()), "lo": lo, "hi": hi}
        print(f"{k}: seed {args.seeds[0]} {per['single'][k].mean():.4f}, ensemble of "
              f"{len(args.seeds)} {per['ensemble'][k].mean():.4f}, difference {d.mean():+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}]")
    out = runs_root() / args.dataset / "retrieval" / f"{args.model}-ens"
    if args.export:
        out.mkdir(parents=True, exist_ok=True)
        metrics, cands = rank_splits(ens, ds, cfg, torch.device("cpu"))
        atomic_write(out / "candidates.parquet", lambda p: cands.to_parquet(p, index=False))
        report.update(val=metrics["val"], test=metrics["test"])
        atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(report, indent=1)))
        print(f"→ {out}/candidates.parquet (test candidate recall@20 "
              f"{metrics['test']['candidates_Recall@20']:.4f})")
    res = REPO_ROOT / "results" / f"retrieval-ensemble-{args.dataset}-{args.model}.json"
    atomic_write(res, lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
