"""int8 serving on CPU: speed and ranking agreement against fp32, paired on the same users.

    python bench/quantize.py --bundle assets/games --users 200 [--threads 2]

Loads the bundle's ranker twice (fp32 as trained; LoRA merged + int8 weight-only linear
layers through torchao, ulmrec.ranker.quantize_int8), scores the same test users whose
target is among the candidates, and reports seconds per prompt (batch 8), Rank NDCG@10 of
each with the paired difference (95% bootstrap CI), top-1 agreement and the mean |Δ letter
probability|.
Writes results/quantize-<dataset>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paired import bootstrap  # noqa: E402
from ulmrec.bundle import load_bundle  # noqa: E402
from ulmrec.metrics import ndcg_per_user, target_ranks  # noqa: E402
from ulmrec.model import score_examples  # noqa: E402
from ulmrec.paths import atomic_write_json  # noqa: E402
from ulmrec.ranker import load_ranker, quantize_int8  # noqa: E402


def timed_scores(model, tok, examples, cfg, batch_size: int):
    score_examples(model, tok, examples[:2], cfg.prompt_format, cfg.max_len, batch_size,
                   cfg.num_candidates, progress=False)  # warm-up (fbgemm packs weights lazily)
    t0 = time.perf_counter()
    _, probs = score_examples(model, tok, examples, cfg.prompt_format, cfg.max_len, batch_size,
                              cfg.num_candidates, progress=True)
    return probs.numpy(), (time.perf_counter() - t0) / len(examples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="assets/games")
    ap.add_argument("--users", type=int, default=200, help="test users whose target was retrieved")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="linear layers kept fp32 (name endings; none: --skip)")
    ap.add_argument("--out", default=None, help="default results/quantize-<dataset>.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    bundle = load_bundle(args.bundle)
    test = bundle.candidates[bundle.candidates["split"] == "test"]
    targets = bundle.users.set_index("user")["target"]
    n = bundle.ranker_config().num_candidates
    users = [int(u) for u, c in zip(test["user"], test["candidates"])
             if int(targets[u]) in [int(i) for i in c][:n]][: args.users]
    examples, cfg = bundle.examples(users, "test")
    pos = [ex.candidates.index(int(targets[ex.user])) for ex in examples]

    model, tok = load_ranker(bundle.root, bundle.ranker_config())
    p32, s32 = timed_scores(model, tok, examples, cfg, args.batch_size)
    model = quantize_int8(model, tuple(args.skip))
    p8, s8 = timed_scores(model, tok, examples, cfg, args.batch_size)

    n32 = ndcg_per_user(target_ranks(p32, pos), 10)
    n8 = ndcg_per_user(target_ranks(p8, pos), 10)
    lo, hi = bootstrap(n8 - n32)
    row = {"bundle": Path(args.bundle).name, "dataset": bundle.dataset, "users": len(examples),
           "threads": torch.get_num_threads(), "skip": args.skip, "batch_size": args.batch_size,
           "fp32_s_per_prompt": s32, "int8_s_per_prompt": s8, "speedup": s32 / s8,
           "fp32_ndcg10": float(n32.mean()), "int8_ndcg10": float(n8.mean()),
           "diff": float((n8 - n32).mean()), "lo": lo, "hi": hi,
           "top1_agreement": float((p32.argmax(1) == p8.argmax(1)).mean()),
           "mean_abs_prob_diff": float(np.abs(p32 - p8).mean()),
           "command": "python bench/quantize.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(args.out or ROOT / "results" / f"quantize-{bundle.dataset}.json")
    atomic_write_json(out, row)
    print(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
