"""How much a residual ranker's LLM term can add to its retriever at any weight on the prior.

    python bench/residual_weight.py --dataset games --run lvp850-s100 [--block 1]

A residual run ranks by LLM term + w · log-softmax(retriever scores), w fixed before training.
This re-sums the saved test predictions (`llm_probs`, `retriever_scores`) over a grid of w and
prints Rank NDCG@10 for each: if no w lifts the sum clear of the retriever's order, the LLM
term lacks the signal and a learned or refitted w is not the lever. A diagnostic read on test
users — never a way to choose w (that is fitted on validation lists in `train.finetune`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/residual_weight.py` from anywhere

from bench.paired import _targets_and_probs, llm_term  # noqa: E402
from ulmrec.fusion import log_softmax  # noqa: E402
from ulmrec.metrics import ndcg_per_user, target_ranks  # noqa: E402
from ulmrec.paths import prediction_suffix, runs_root  # noqa: E402

GRID = (0.0, 0.25, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)


def weight_curve(frame: pd.DataFrame, grid=GRID) -> dict[str, float]:
    """Mean Rank NDCG@10 over the users whose target is listed: one entry per w of `grid`, and
    the retriever's own order (w → ∞)."""
    pos, llm_probs = _targets_and_probs(llm_term(frame))
    keep = pos >= 0
    llm = np.log(llm_probs[keep] + 1e-30)                                                   # [U, K]
    prior = log_softmax(np.stack(frame["retriever_scores"].map(np.asarray).to_list())[keep])  # [U, K]
    curve = {f"w {w:g}": float(ndcg_per_user(target_ranks(llm + w * prior, pos[keep]), 10).mean())
             for w in grid}
    curve["retriever order"] = float(ndcg_per_user(pos[keep] + 1.0, 10).mean())
    return curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--run", required=True, help="a residual run evaluated by train.evaluate")
    ap.add_argument("--block", type=int, default=0, help="the test sample (train.evaluate --sample-block)")
    args = ap.parse_args(argv)
    path = runs_root() / args.dataset / "finetune" / args.run / \
        f"test_predictions{prediction_suffix(block=args.block)}.parquet"
    if not path.exists():
        print(f"error: {path} not found (run `python -m train.evaluate --runs {args.run}` first)",
              file=sys.stderr)
        return 2
    frame = pd.read_parquet(path)
    missing = {"llm_probs", "retriever_scores"} - set(frame.columns)
    if missing:
        print(f"error: {path.name} of {args.run} lacks {', '.join(sorted(missing))}: "
              "not a residual run's predictions", file=sys.stderr)
        return 2
    curve = weight_curve(frame)
    print(f"{args.dataset} {args.run}, sample {args.block}: Rank NDCG@10 of LLM term + w · prior")
    for name, v in curve.items():
        print(f"  {name:>16}  {v:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
