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

from ..trainer import TrainingArguments, fit, total_steps
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


def train_sft(model: P2RecLM, histories: list[list[int]], targets: np.ndarray, *, epochs: int,
              lr: float, batch_size: int, seed: int, out: Path, max_grad_norm: float = 1.0,
              stop_after: int = 0) -> dict:
    """Train LoRA + projection + head on user-level examples through the one training loop
    (ulmrec.trainer.fit: constant LR, no warmup, the gradient norm clipped; a checkpoint under
    out/checkpoint after every epoch, so an interrupted run resumes). Returns the per-epoch
    loss history (epochs trained in this call carry their seconds) and whether it finished."""
    rows = [{"history": h, "target": y} for h, y in zip(histories, np.asarray(targets, np.float32))]
    args = TrainingArguments(learning_rate=lr, num_epochs=epochs, batch_size=batch_size,
                             warmup_steps=0, lr_schedule="constant", max_grad_norm=max_grad_norm,
                             stop_after=stop_after)
    per_epoch, _ = total_steps(len(rows), args)
    args.ckpt_every = per_epoch
    summary = fit(model, rows, args, out, loss_fn=_loss, collate_fn=_collate, seed=seed,
                  desc="P2Rec SFT")
    losses = summary.get("losses", [])
    done_before = summary["steps"] - len(summary.get("lr", []))      # steps of earlier calls
    secs = summary.get("train_seconds_this_process", 0.0) / max(1, len(summary.get("lr", [])))
    history = []
    for e in range(len(losses) // per_epoch):
        step_losses = losses[e * per_epoch:(e + 1) * per_epoch]
        ran_now = (e + 1) * per_epoch > done_before
        history.append({"epoch": e + 1, "loss": float(np.mean(step_losses)),
                        "seconds": secs * per_epoch if ran_now else None, "examples": len(rows)})
        log.info("SFT epoch %d: MSE %.5f over %d user examples", e + 1, history[-1]["loss"], len(rows))
    return {"epoch": len(history), "history": history,
            "finished": not summary.get("interrupted", False)}


def _collate(rows: list[dict]) -> dict:
    return {"history": [r["history"] for r in rows],
            "target": torch.as_tensor(np.stack([r["target"] for r in rows]))}


def _loss(model: P2RecLM, batch: dict) -> torch.Tensor:
    return sft_loss(model(batch["history"])[1], batch["target"])


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
