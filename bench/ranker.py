"""Ranker speed on this machine: LoRA training tokens/s, verbalizer latency and throughput.

    python bench/ranker.py --dataset games --config configs/cpu.yaml [--users 32]

Uses the configured backbone (default: the embedded SmolLM2-135M-Instruct) and real
prompts of the dataset; candidates come from the configured retriever, or random ones.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ulmrec.finetune import FinetuneConfig  # noqa: E402
from ulmrec.config import parse_config  # noqa: E402
from ulmrec.data import load_dataset  # noqa: E402
from ulmrec.model import collate, encode, score_examples  # noqa: E402
from ulmrec.ranker import build_ranker, load_candidates, load_task_inputs  # noqa: E402
from ulmrec.report import markdown_table  # noqa: E402
from ulmrec.tasks import eval_examples, training_examples  # noqa: E402


@dataclass
class BenchConfig(FinetuneConfig):
    users: int = 32
    train_steps: int = 5


def main(argv=None) -> int:
    cfg = parse_config(BenchConfig, argv)
    torch.manual_seed(cfg.seed)
    ds = load_dataset(cfg.data_config())
    inp, _ = load_task_inputs(ds, cfg)
    try:
        cands = load_candidates(ds, cfg, "test")
    except FileNotFoundError:
        cands = load_candidates(ds, type(cfg)(**{**cfg.__dict__, "retriever": "random"}), "test")
    model, tok = build_ranker(cfg, ds)
    device = next(model.parameters()).device
    exs, _ = eval_examples(ds, inp, cands, "test", cfg)
    exs = exs[: cfg.users]
    lengths = [len(encode(tok, e, cfg.prompt_format, cfg.max_len, False)["input_ids"]) for e in exs]

    score_examples(model, tok, exs[:1], cfg.prompt_format, cfg.max_len, 1, progress=False)  # warm-up
    t0 = time.perf_counter()
    score_examples(model, tok, exs[:8], cfg.prompt_format, cfg.max_len, 1, progress=False)
    latency = (time.perf_counter() - t0) / min(8, len(exs))
    t0 = time.perf_counter()
    score_examples(model, tok, exs, cfg.prompt_format, cfg.max_len, cfg.eval_batch_size, progress=False)
    users_per_s = len(exs) / (time.perf_counter() - t0)

    train = [encode(tok, e, cfg.prompt_format, cfg.max_len)
             for e in training_examples(inp, cfg)[: cfg.train_steps * cfg.batch_size]]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(train), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(train[i:i + cfg.batch_size], tok.pad_token_id).items()}
        model(**batch).loss.backward()
        optim.step()
        optim.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    train_s = time.perf_counter() - t0

    name = cfg.backbone or "SmolLM2-135M-Instruct (embedded)"
    print(f"ranker benchmark — {ds.name}, {name}, {device}, {torch.get_num_threads()} threads")
    head = ["prompt tokens (mean)", "latency s/user (batch 1)", f"users/s (batch {cfg.eval_batch_size})",
            f"train tokens/s (batch {cfg.batch_size})", "s/step"]
    row = [f"{sum(lengths) / len(lengths):.0f}", f"{latency:.3f}", f"{users_per_s:.2f}",
           f"{tokens / train_s:.0f}", f"{train_s / max(1, len(train) // cfg.batch_size):.2f}"]
    print(markdown_table(head, [row], "rrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
