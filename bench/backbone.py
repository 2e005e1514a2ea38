"""Packaged backbones side by side: load time, LoRA step time, untuned verbalizer quality.

    python bench/backbone.py                                   # smollm2-135m vs gemma3-270m
    python bench/backbone.py --first-load --users 200 --threads 1

Per backbone:
- load: the backbone + tokenizer from the converted cache (`cached`), and with --first-load
  also from the packaged GGUF into an empty temporary cache (`first`: assemble, de-quantize,
  convert the tokenizer, save, load);
- step: one LoRA (q, v) optimizer step of the ranker as train.finetune builds it (index
  tokens added, response-only loss with logits_to_keep) on a batch of `batch` real next-item
  prompts cut to `tokens` tokens each; the median of `steps` timed steps after one warm-up;
- untuned: the verbalizer's Rank NDCG@10 of the untuned backbone (its own prompt format:
  chat template or plain) on `users` test users whose target the retriever holds, next to
  the retriever's own order on the same users — only when the retriever's candidates exist.

Writes results/backbone.json. Timings depend on the machine's load: compare rows of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulmrec import backbone as bb  # noqa: E402
from ulmrec.data import load_dataset  # noqa: E402
from ulmrec.metrics import metrics_from_ranks, sample_eval_users, target_ranks  # noqa: E402
from ulmrec.model import collate, encode, response_loss, score_examples  # noqa: E402
from ulmrec.paths import atomic_write_json, repo_path, runs_root  # noqa: E402
from ulmrec.prompts import resolve_format  # noqa: E402
from ulmrec.report import markdown_table  # noqa: E402
from ulmrec.ranker import RankerConfig, build_ranker, load_base, load_candidates, load_task_inputs  # noqa: E402
from ulmrec.bundle import ServeConfig  # noqa: E402
from ulmrec.tasks import eval_examples, training_examples  # noqa: E402


def config(args, name: str | None) -> ServeConfig:
    """Next-item prompts with the history only (no index, no preferences: an untuned
    backbone knows neither), `history` titles."""
    return ServeConfig(dataset=args.dataset, backbone=name, index_kind="none", preference_source="none",
               tasks=("next_item",), task_ratio=(1.0,), max_history=args.history, retriever="lrurec")


def time_load(name: str, first: bool) -> float:
    """Seconds to a loaded (model, tokenizer); `first` converts into an empty cache."""
    old = os.environ.get("ULMREC_CACHE")
    tmp = tempfile.mkdtemp(prefix="bench-backbone.") if first else None
    try:
        if tmp:
            os.environ["ULMREC_CACHE"] = tmp
        t0 = time.perf_counter()
        model, tok = load_base(RankerConfig(backbone=name))
        secs = time.perf_counter() - t0
        del model, tok
        return secs
    finally:
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
            if old is None:
                os.environ.pop("ULMREC_CACHE", None)
            else:
                os.environ["ULMREC_CACHE"] = old


def prepare_steps(args, name: str, ds, inp):
    """The ranker as train.finetune builds it, its optimizer and fixed-shape batches."""
    cfg = config(args, name)
    model, tok = build_ranker(cfg, ds)
    fmt = resolve_format(cfg.prompt_format, tok)
    need = args.batch * (args.steps + 1)
    encoded = []
    for ex in training_examples(inp, cfg):
        enc = encode(tok, ex, fmt, args.tokens)
        if enc["truncated"]:                      # exactly `tokens` tokens: a fixed batch shape
            encoded.append(enc)
        if len(encoded) == need:
            break
    batches = [collate(encoded[i:i + args.batch], tok.pad_token_id)
               for i in range(0, len(encoded), args.batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    info = {"format": fmt, "batch": list(batches[0]["input_ids"].shape),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params), "vocab": len(tok)}
    return model, torch.optim.AdamW(params, lr=1e-4), batches, info


def one_step(model, optim, batch) -> float:
    t0 = time.perf_counter()
    loss = response_loss(model, batch)
    loss.backward()
    optim.step()
    optim.zero_grad()
    return time.perf_counter() - t0


def time_steps(args, names: list[str], ds, inp) -> dict[str, dict]:
    """Step times of every backbone, interleaved step by step (A, B, A, B, …) so that a
    change in the machine's load hits all of them alike; the first round warms up."""
    runs = {n: prepare_steps(args, n, ds, inp) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.steps + 1):
        for n, (model, optim, batches, _) in runs.items():
            secs = one_step(model, optim, batches[i])
            if i:
                times[n].append(secs)
    out = {}
    for n, (_, _, _, info) in runs.items():
        out[n] = {**info, "step_s_median": statistics.median(times[n]), "step_s_min": min(times[n]),
                  "step_s": times[n]}
    del runs
    return out


def untuned(args, name: str, ds, inp, cands, users) -> dict:
    cfg = config(args, name)
    model, tok = load_base(cfg)
    model.eval()
    exs, _ = eval_examples(ds, inp, cands, "test", cfg, users)
    t0 = time.perf_counter()
    scores, _ = score_examples(model, tok, exs, cfg.prompt_format, cfg.max_len, 4, progress=False)
    secs = time.perf_counter() - t0
    pos = [e.candidates.index(e.target) for e in exs]
    rank = metrics_from_ranks(target_ranks(scores.numpy(), pos), ks=(10,))
    retr = metrics_from_ranks(np.array(pos, dtype=float) + 1, ks=(10,))   # 1-based
    return {"format": resolve_format(cfg.prompt_format, tok), "users": len(exs),
            "rank_ndcg10": rank["NDCG@10"], "retriever_rank_ndcg10": retr["NDCG@10"],
            "seconds_per_user": secs / max(1, len(exs))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=list(bb.BACKBONES))
    ap.add_argument("--dataset", default="games")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=277)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--users", type=int, default=100, help="test users for the untuned score (0: skip)")
    ap.add_argument("--first-load", action="store_true", help="also time a first load (conversion)")
    ap.add_argument("--out", default="results/backbone.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ds = load_dataset(args.dataset)
    inp, _ = load_task_inputs(ds, config(args, None))
    cand_file = runs_root() / ds.name / "retrieval" / "lrurec" / "candidates.parquet"
    cands = users = None
    if args.users and cand_file.exists():
        cands = load_candidates(ds, config(args, None), "test")
        held = cands[[int(t) in [int(c) for c in cs][:20] for t, cs in zip(cands["target"], cands["candidates"])]]
        users = sorted(sample_eval_users(held["user"], args.users, 0))
    rows = {}
    for name in args.backbones:
        bb.resolve_backbone(name)                 # convert outside the timings when needed
        rows[name] = {"cached_load_s": time_load(name, False)}
        if args.first_load:
            rows[name]["first_load_s"] = time_load(name, True)
    if args.steps:
        for name, r in time_steps(args, args.backbones, ds, inp).items():
            rows[name].update(r)
    for name in args.backbones:
        if cands is not None:
            rows[name]["untuned"] = untuned(args, name, ds, inp, cands, users)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "step_s"}), flush=True)

    print(f"\nbackbones on {ds.name}, {args.threads} thread(s), LoRA (q,v) step at batch "
          f"{args.batch} x {args.tokens} tokens with logits_to_keep")
    table = []
    for name, r in rows.items():
        u = r.get("untuned", {})
        first = f"{r['first_load_s']:.1f}" if "first_load_s" in r else "–"
        params = f"{r['parameters'] / 1e6:.0f}M" if "parameters" in r else "–"
        fmt = r.get("format") or u.get("format", "–")
        table.append([name, params, fmt, first, f"{r['cached_load_s']:.1f}",
                      f"{r.get('step_s_median', float('nan')):.2f}",
                      f"{u.get('rank_ndcg10', float('nan')):.4f} ({u.get('users', 0)} users)",
                      f"{u.get('retriever_rank_ndcg10', float('nan')):.4f}"])
    print(markdown_table(["backbone", "params", "format", "load first s", "load cached s", "step s (median)",
                          "untuned Rank NDCG@10", "retriever order, same users"], table, "lrlrrrrr"))
    atomic_write_json(repo_path(args.out), {
        "command": "python bench/backbone.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "dataset": ds.name, "threads": args.threads, "load_average": os.getloadavg(),
        "backbones": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
