"""Does a bundle's live retriever give a table user the list the bundle exported for them?

    python bench/live_lists.py --bundle assets/games --users 500

For sampled test users, runs the bundle's retriever (retriever/) on the user's history up to
the test item, exactly as a new user's request would (ulmrec.live), and compares its top-20
with the exported test list (candidates.parquet): same items in the same order, and the
largest score difference. Writes results/live-lists-<dataset>.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # `python bench/live_lists.py` from anywhere

from ulmrec.bundle import load_bundle  # noqa: E402
from ulmrec.paths import atomic_write_json, display_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "assets" / "games"))
    ap.add_argument("--users", type=int, default=500, help="sampled test users (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="default results/live-lists-<dataset>.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    b = load_bundle(args.bundle)
    retriever = b.live_retriever()
    k = b.ranker_config().num_candidates
    test = b.candidates[b.candidates["split"] == "test"].set_index("user")
    users = sorted(test.index)
    if args.users and args.users < len(users):
        users = sorted(random.Random(args.seed).sample(users, args.users))
    history = b.users.set_index("user")["history"]
    same, worst, t0 = 0, 0.0, time.time()
    for u in users:
        items, scores = retriever.top(list(history[u]), k)
        exported = [int(i) for i in test.at[u, "candidates"]][:k]
        same += items == exported
        worst = max(worst, max(abs(a - e) for a, e in zip(scores, test.at[u, "scores"][:k])))
    res = {"bundle": display_path(b.root), "dataset": b.dataset, "users": len(users),
           "identical_lists": same, "max_score_difference": worst,
           "seconds_per_user": round((time.time() - t0) / len(users), 4), "threads": args.threads}
    out = Path(args.out) if args.out else ROOT / "results" / f"live-lists-{b.dataset}.json"
    atomic_write_json(out, res)
    print(json.dumps(res))
    return 0 if same == len(users) else 1


if __name__ == "__main__":
    sys.exit(main())
