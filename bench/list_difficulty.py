"""How hard the retriever's lists are, split by split: a ranker trained on one split's lists
learns that split's odds, so its training lists should look like the test's.

    python bench/list_difficulty.py --dataset games [--retriever lrurec]

Per split of runs/<dataset>/retrieval/<retriever>/candidates.parquet: the share of users whose
target is among the 20, and among those lists how often it is first, its mean NDCG@10 in the
retriever's order (the Rank view's bar) and the mean score gap between the first two
candidates (how sure the retriever is). The training lists are retrieved for targets the
retriever was trained on; the validation lists are not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/list_difficulty.py`

from ulmrec.metrics import ndcg_per_user  # noqa: E402
from ulmrec.paths import runs_root  # noqa: E402
from ulmrec.report import markdown_table  # noqa: E402


def difficulty(frame: pd.DataFrame, k: int = 20) -> dict:
    pos = np.array([[int(c) for c in cs][:k].index(int(t)) if int(t) in [int(c) for c in cs][:k]
                    else -1 for cs, t in zip(frame["candidates"], frame["target"])])
    held = pos >= 0
    scores = np.stack(frame["scores"].map(lambda s: np.asarray(s, dtype=float)[:k]).to_list())
    return {"users": len(frame), "held": float(held.mean()),
            "first": float((pos[held] == 0).mean()),
            "ndcg10": float(ndcg_per_user(pos[held] + 1, 10).mean()),
            "gap": float((scores[:, 0] - scores[:, 1]).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--retriever", default="lrurec")
    args = ap.parse_args(argv)
    path = runs_root() / args.dataset / "retrieval" / args.retriever / "candidates.parquet"
    if not path.exists():
        print(f"error: {path} not found (run `python -m train.retrieve --dataset {args.dataset} "
              f"--model {args.retriever}`)", file=sys.stderr)
        return 2
    frame = pd.read_parquet(path)
    rows = []
    for split in ("train", "val", "test"):
        part = frame[frame["split"] == split]
        if len(part):
            d = difficulty(part)
            rows.append([split, f"{d['users']:,}", f"{d['held']:.1%}", f"{d['first']:.1%}",
                         f"{d['ndcg10']:.4f}", f"{d['gap']:.3f}"])
    print(markdown_table(["lists", "users", "target among the 20", "target first (of those)",
                          "NDCG@10 in retriever order (of those)", "score gap 1st − 2nd"],
                         rows, "lrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
