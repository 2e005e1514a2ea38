"""Review-encoder throughput on CPU (reviews/s), on real training reviews of a dataset.

    python bench/indexing.py --dataset gift-cards --n 512 --threads 1
    python bench/indexing.py --dataset games --n 1024 --threads 2   # titles ('title_proxy')

Encodes the first `n` unique training texts without the cache (length-sorted batches,
mean pooling, as train.index does) and prints/writes reviews/s and tokens/s.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ulmrec.config import parse_config  # noqa: E402
from ulmrec.data import load_dataset  # noqa: E402
from ulmrec.indexing.encoder import embed, load_encoder  # noqa: E402
from ulmrec.indexing.reviews import build_review_sets  # noqa: E402
from ulmrec.paths import atomic_write, runs_root  # noqa: E402


@dataclass
class BenchConfig:
    """Sentence-encoder throughput benchmark."""
    dataset: str = "gift-cards"
    encoder: str = ""
    n: int = 512
    batch_size: int = 64
    max_length: int = 256
    threads: int = 1
    repeats: int = 1


def main(argv=None) -> int:
    cfg = parse_config(BenchConfig, argv)
    torch.set_num_threads(cfg.threads)
    ds = load_dataset(cfg.dataset)
    texts = build_review_sets(ds).texts[:cfg.n]
    enc = load_encoder(cfg.encoder, cfg.max_length, cfg.batch_size)
    tokens = sum(len(ids) for ids in enc.tokenizer(texts, truncation=True,
                                                   max_length=cfg.max_length)["input_ids"])
    embed(enc, texts[:cfg.batch_size], desc="warm-up")
    times = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        embed(enc, texts, desc="bench")
        times.append(time.perf_counter() - t0)
    best = min(times)
    res = {**asdict(cfg), "model": enc.name, "texts": len(texts), "tokens": tokens,
           "seconds": round(best, 2), "reviews_per_s": round(len(texts) / best, 1),
           "tokens_per_s": round(tokens / best, 1), "mean_tokens": round(tokens / len(texts), 1)}
    out = runs_root() / ds.name / "bench" / f"indexing-t{cfg.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(res, indent=1)))
    print(f"{ds.name}: {res['texts']} texts ({res['mean_tokens']} tokens avg), "
          f"{cfg.threads} thread(s): {res['reviews_per_s']} reviews/s, {res['tokens_per_s']} tokens/s"
          f"  [{out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
