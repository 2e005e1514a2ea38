"""Paired comparison of rankers on the same users: per-user Rank NDCG@10 differences with a
bootstrap confidence interval, for the quality ordering (ULMRec > LlamaRec > retriever order).

    python bench/paired.py --dataset games --runs ulmrec-hard llamarec-hard llamarec-hard120
    python bench/paired.py --dataset games --runs ulmrec-staged ulmrec-staged-s43 \
        --ensemble ulmrec-staged,ulmrec-staged-s43      # + their averaged letter log-probs

Reads the per-user predictions `train.evaluate` leaves beside each run's adapter
(runs/<dataset>/finetune/<run>/test_predictions.parquet: user, candidates in retriever order,
target, letter probabilities), keeps the users every run scored, and compares each pair of
systems — the retriever's own order included — on the same users. A difference whose 95%
interval excludes 0 is one this many users can tell apart.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/paired.py` from anywhere

from ulmrec.metrics import ndcg_per_user, order_habits, target_ranks  # noqa: E402
from ulmrec.paths import atomic_write, orders_name, prediction_suffix, runs_root  # noqa: E402
from ulmrec.report import markdown_table  # noqa: E402


def _targets_and_probs(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(target position in each list or -1 [U], letter probabilities [U, K]) of a predictions frame."""
    pos = np.array([list(c).index(t) if t in list(c) else -1
                    for c, t in zip(frame["candidates"], frame["target"])])
    return pos, np.stack(frame["probs"].map(np.asarray).to_list())


def per_user(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(LLM NDCG@10, retriever-order NDCG@10) per user of one run's predictions."""
    pos, probs = _targets_and_probs(frame)
    llm = ndcg_per_user(target_ranks(probs, pos), 10)
    retr = ndcg_per_user(np.where(pos >= 0, pos + 1.0, np.inf), 10)
    return llm, retr


def llm_term(frame: pd.DataFrame) -> pd.DataFrame:
    """A residual run's predictions as its LLM term alone ranks them (llm_probs as probs)."""
    return frame.assign(probs=frame["llm_probs"])


def position_habits(frame: pd.DataFrame) -> tuple[float, float]:
    """(share of users whose top letter is A, mean Spearman of the order with the list's)."""
    h = order_habits(_targets_and_probs(frame)[1])
    return h["top_letter_a"], h["spearman_with_retriever"]


def fused_per_user(frame: pd.DataFrame, lam: float) -> np.ndarray:
    """NDCG@10 per user of the run's letter probabilities fused with the retriever prior
    (a residual run's LLM term: the prior is fitted on it)."""
    from ulmrec.fusion import fuse
    if _is_residual(frame):
        frame = llm_term(frame)
    pos, probs = _targets_and_probs(frame)
    retr = np.stack(frame["retriever_scores"].map(np.asarray).to_list())
    return ndcg_per_user(target_ranks(fuse(probs, retr, lam), pos), 10)


def ensemble_per_user(frames: list[pd.DataFrame]) -> np.ndarray:
    """NDCG@10 per user of the runs' letter log-probabilities averaged (same users, same lists)."""
    from ulmrec.fusion import letter_log_probs
    parts = [_targets_and_probs(f) for f in frames]
    logp = np.mean([letter_log_probs(probs) for _, probs in parts], axis=0)     # [U, K]
    return ndcg_per_user(target_ranks(logp, parts[0][0]), 10)


def _is_residual(frame: pd.DataFrame) -> bool:
    """Whether the run ranks by something other than its LLM term (a residual run)."""
    if "llm_probs" not in frame:
        return False
    return not all(np.allclose(a, b) for a, b in zip(frame["probs"], frame["llm_probs"]))


def bootstrap(diff: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--ensemble", nargs="*", default=[], metavar="RUN,RUN[,...]",
                    help="add a system averaging these runs' letter log-probabilities")
    ap.add_argument("--bootstrap", type=int, default=10_000)
    ap.add_argument("--block", type=int, default=0,
                    help="the disjoint user sample `train.evaluate --sample-block B` scored (0 = the usual)")
    ap.add_argument("--orders", type=int, default=1,
                    help="read the predictions `train.evaluate --test-orders N` wrote (1 = one order)")
    ap.add_argument("--out", default=None, help="JSON of the pairs (default results/paired-<dataset>.json)")
    ap.add_argument("--merge", action="store_true",
                    help="add the pairs to --out's rows instead of replacing the file (a pair "
                         "already there for the same systems and sample is replaced)")
    args = ap.parse_args(argv)

    frames = {}
    for run in args.runs:
        suffix = prediction_suffix(block=args.block, orders=args.orders)
        path = runs_root() / args.dataset / "finetune" / run / f"test_predictions{suffix}.parquet"
        if not path.exists():
            print(f"error: {path} not found (run `python -m train.evaluate --runs {run}` first)",
                  file=sys.stderr)
            return 2
        frames[run] = pd.read_parquet(path).set_index("user").sort_index()
    users = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    scores, habits = {}, {}
    for run, f in frames.items():
        # named as train.evaluate names the row, so that merged pairs of 1 and N orders differ
        name = orders_name(run, args.orders)
        llm, retr = per_user(f.loc[users].reset_index())
        scores[name] = llm
        habits[name] = position_habits(f.loc[users].reset_index())
        scores.setdefault("retriever order", retr)
        if _is_residual(f):
            alone = llm_term(f.loc[users].reset_index())
            scores[f"{name} (LLM term alone)"] = per_user(alone)[0]
            habits[f"{name} (LLM term alone)"] = position_habits(alone)
        # λ was fitted on validation users: the same for every test sample
        fit = runs_root() / args.dataset / "finetune" / run / \
            f"fusion{prediction_suffix(orders=args.orders)}.json"
        if fit.exists() and "retriever_scores" in f:       # λ fitted on validation users
            lam = json.loads(fit.read_text())["lambda"]
            scores[f"{name} + retriever prior"] = fused_per_user(f.loc[users].reset_index(), lam)
    for spec in args.ensemble:
        members = spec.split(",")
        unknown = [m for m in members if m not in frames]
        if len(members) < 2 or unknown:
            print(f"error: --ensemble {spec}: name two or more of --runs"
                  + (f" (not among them: {', '.join(unknown)})" if unknown else ""), file=sys.stderr)
            return 2
        if any(list(frames[m].loc[users, "candidates"].map(list)) !=
               list(frames[members[0]].loc[users, "candidates"].map(list)) for m in members):
            print(f"error: --ensemble {spec}: the runs ranked different candidate lists", file=sys.stderr)
            return 2
        scores[f"ensemble of {' + '.join(members)}"] = ensemble_per_user(
            [frames[m].loc[users].reset_index() for m in members])
    print(f"{args.dataset}: {len(users)} users ranked by every run (target among the 20)\n")
    systems = []
    for name, s in scores.items():
        a, rho = habits.get(name, (float("nan"), float("nan")))
        systems.append([name, f"{s.mean():.4f}", f"{a:.1%}", f"{rho:.2f}"])
    print(markdown_table(["system", "Rank NDCG@10", "top letter A", "Spearman with the list's order"],
                         systems, "lrrr"))
    rows, pairs = [], []
    for a, b in itertools.combinations(scores, 2):
        d = scores[a] - scores[b]
        lo, hi = bootstrap(d, args.bootstrap)
        rows.append({"a": a, "b": b, "mean": float(d.mean()), "lo": lo, "hi": hi,
                     "sample": args.block, "users": len(users), "a_better": int((d > 0).sum()),
                     "b_better": int((d < 0).sum())})
        pairs.append([f"{a} − {b}", f"{d.mean():+.4f}", f"[{lo:+.4f}, {hi:+.4f}]",
                      f"{int((d > 0).sum())} / {int((d < 0).sum())} / {int((d == 0).sum())}"])
    print("\n" + markdown_table(["A − B", "mean difference", "95% bootstrap CI",
                                 "A better / B better / tie (users)"], pairs, "lrll"))
    out = Path(args.out) if args.out else Path(__file__).resolve().parents[1] / "results" / f"paired-{args.dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge and out.exists():
        new = {(r["a"], r["b"], r["sample"]) for r in rows}
        rows = [r for r in json.loads(out.read_text())
                if (r["a"], r["b"], r.get("sample", 0)) not in new] + rows
    atomic_write(out, lambda p: p.write_text(json.dumps(rows, indent=1) + "\n"))
    print(f"\n{len(rows)} pairs (a − b, 95% CI) → {out.name}; systems: "
          + ", ".join(f"{k} {v.mean():.4f}" for k, v in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
