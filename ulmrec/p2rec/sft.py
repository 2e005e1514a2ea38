"""User-level SFT (one example per user, eq. 4) and the instance-level cost it avoids.

Instance-level SFT (E4SRec, LlamaRec) makes one example per training prefix — every
(history before item t → item t) — so the LLM runs O(Σ|S_u|) times per epoch; P2Rec's
user-level task runs it O(M) times. `instance_examples` builds those prefixes from the same
training data so the two costs can be timed on the same model and code path.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..paths import atomic_write
from .llm import P2RecLM, sft_loss

log = logging.getLogger(__name__)


def instance_examples(histories: list[list[int]], groups: np.ndarray, k: int):
    """(prefix histories, one-hot group target [T, K] of the next item) for every training
    prefix with at least one item: the instance-level task built on the same data."""
    hist, nxt = [], []
    for seq in histories:
        for t in range(1, len(seq)):
            hist.append(seq[:t])
            nxt.append(groups[seq[t]])
    return hist, np.eye(k, dtype=np.float32)[np.asarray(nxt, dtype=np.int64)]


def batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled example indices per batch; depends only on (seed, epoch) so resumes repeat it."""
    order = np.random.default_rng(seed * 1_000_003 + epoch).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_sft(model: P2RecLM, histories: list[list[int]], targets: np.ndarray, *, epochs: int,
              lr: float, batch_size: int, seed: int, out: Path, max_grad_norm: float = 1.0) -> dict:
    """Train LoRA + projection + head on user-level examples; resumable per epoch from
    out/sft_last.pt. Returns the loss history and the LLM time (forward + backward + step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    y = torch.as_tensor(targets, dtype=torch.float32)
    state = {"epoch": 0, "history": []}
    last = out / "sft_last.pt"
    if last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        assert not model.load_state_dict(ckpt["trainable"], strict=False).unexpected_keys
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        log.info("SFT resumed after epoch %d", state["epoch"])
    for epoch in range(state["epoch"], epochs):
        model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for idx in tqdm(batches(len(histories), batch_size, seed, epoch), desc=f"SFT epoch {epoch + 1}",
                        unit="batch", leave=False):
            _, pred = model([histories[i] for i in idx])
            loss = sft_loss(pred, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            total += loss.item() * len(idx)
            n += len(idx)
        secs = time.perf_counter() - t0
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "loss": total / n, "seconds": secs,
                                 "examples": n})
        log.info("SFT epoch %d: MSE %.5f over %d user examples, %.1f s", epoch + 1, total / n, n, secs)
        ckpt = {"trainable": model.trainable_state(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "state": state}
        atomic_write(last, lambda p, c=ckpt: torch.save(c, p))
    return state


@torch.no_grad()
def mean_loss(model: P2RecLM, histories, targets: np.ndarray, batch_size: int = 32) -> float:
    model.eval()
    y = torch.as_tensor(targets, dtype=torch.float32)
    total = 0.0
    for i in range(0, len(histories), batch_size):
        _, pred = model(histories[i:i + batch_size])
        total += sft_loss(pred, y[i:i + batch_size].to(pred.device)).item() * len(pred)
    return total / len(histories)


def time_steps(model: P2RecLM, histories, targets: np.ndarray, batch_size: int, n_examples: int,
               seed: int = 0) -> dict:
    """Seconds per example of training steps (forward + backward, no optimiser update so the
    model is left unchanged) on a random sample of at most n_examples; the per-epoch time of a
    larger set is this × its size (a random sample keeps the length mix of the full set)."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(histories))[:n_examples]
    y = torch.as_tensor(targets, dtype=torch.float32)
    device = next(model.parameters()).device
    model.train()
    t0 = time.perf_counter()
    for i in range(0, len(pick), batch_size):
        idx = pick[i:i + batch_size]
        _, pred = model([histories[j] for j in idx])
        sft_loss(pred, y[idx].to(device)).backward()
    secs = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return {"examples_timed": len(pick), "seconds": secs,
            "seconds_per_example": secs / max(len(pick), 1)}
