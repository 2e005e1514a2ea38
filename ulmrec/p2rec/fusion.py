"""Fusion: new retrievers whose item table carries the P2Rec knowledge (+P2Rec) or the
pre-group id (+CI), trained and evaluated exactly like the Base model.

Both retrievers read items through `model.item_emb` — `item_emb(ids)` for the input and
`item_emb.weight` for the tied output scores — so a module with a computed `.weight` put in its
place changes both without touching the retrieval code.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..paths import atomic_write
from ..retrieval import RetrievalConfig, build_model
from ..retrieval.data import eval_histories, train_windows
from ..retrieval.evaluate import full_rank, summarize
from ..retrieval.trainer import make_optimizer, rank_splits, train_epoch

log = logging.getLogger(__name__)

# "emb" is our control, not in the paper: the same gate fed the grouping retriever's own item
# embeddings instead of the LLM's, to tell the LLM's contribution from plain transfer of a
# pre-trained embedding (the enhanced embeddings are computed from those very embeddings)
VARIANTS = ("base", "ci", "p2rec", "emb")


class GatedItemTable(nn.Module):
    """weight [N+1, d] = g ⊙ e + (1 − g) ⊙ P(k), g = σ(W [e; P(k)] + b): a per-dimension gate
    between the model's own (trained from scratch) embedding e and its frozen LLM-enhanced
    embedding k projected to the model's width."""

    def __init__(self, own: nn.Embedding, enhanced: torch.Tensor):
        super().__init__()
        self.own = own
        d = own.embedding_dim
        # standardised per dimension: LLM hidden states have a few huge dimensions
        real = enhanced[1:]
        z = (enhanced - real.mean(0)) / (real.std(0) + 1e-6)
        z[0] = 0.0
        self.register_buffer("enhanced", z.float())                                 # [N+1, D] frozen
        self.proj = nn.Linear(enhanced.shape[1], d)
        self.gate = nn.Linear(2 * d, d)
        nn.init.trunc_normal_(self.proj.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.proj.bias)
        nn.init.zeros_(self.gate.bias)                                              # g ≈ 0.5 at start

    @property
    def weight(self) -> torch.Tensor:
        e, k = self.own.weight, self.proj(self.enhanced)                            # [N+1, d] each
        g = torch.sigmoid(self.gate(torch.cat([e, k], -1)))
        return g * e + (1 - g) * k

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return F.embedding(items, self.weight)


class GroupItemTable(nn.Module):
    """weight = e + c[group(item)]: the CI variant, the pre-group id as a learnable feature
    shared by every item of the group (padding gets its own row K)."""

    def __init__(self, own: nn.Embedding, groups: np.ndarray, k: int):
        super().__init__()
        self.own = own
        g = torch.as_tensor(groups, dtype=torch.long).clone()
        g[g < 0] = k
        self.register_buffer("groups", g)                                           # [N+1]
        self.group_emb = nn.Embedding(k + 1, own.embedding_dim)
        nn.init.trunc_normal_(self.group_emb.weight, std=0.02, a=-0.04, b=0.04)

    @property
    def weight(self) -> torch.Tensor:
        return self.own.weight + self.group_emb(self.groups)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return F.embedding(items, self.weight)


def build_variant(cfg: RetrievalConfig, num_items: int, variant: str, groups=None, k=None,
                  enhanced=None) -> nn.Module:
    """A fresh retriever; with the same seed the base weights are identical across variants
    (the extra modules are created after them), so only the item table differs."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_items)
    if variant == "ci":
        model.item_emb = GroupItemTable(model.item_emb, groups, k)
    elif variant in ("p2rec", "emb"):
        model.item_emb = GatedItemTable(model.item_emb, enhanced)
    elif variant != "base":
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return model


def train_variant(ds, cfg: RetrievalConfig, variant: str, out: Path, device, **extras) -> dict:
    """Train with early stopping on validation `best_metric`, evaluate the best weights on
    val/test (full ranking) and write metrics.json, candidates.parquet, model.safetensors."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_variant(cfg, ds.num_items, variant, **extras).to(device)
    opt = make_optimizer(model, cfg)
    windows = train_windows(list(ds.sequences("train")), cfg.max_len)
    _, val_hist, val_targets = eval_histories(ds, "val")
    best, best_epoch, bad, best_state, history = -math.inf, 0, 0, None, []
    for epoch in range(cfg.max_epochs):
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, windows, cfg, epoch, device)
        val = summarize(full_rank(model, val_hist, val_targets, cfg.max_len, cfg.eval_batch_size,
                                  cfg.num_candidates, device, desc="val"), val_targets)
        history.append({"epoch": epoch + 1, "loss": loss, "seconds": time.perf_counter() - t0,
                        "val_NDCG@10": val["NDCG@10"], "val_Recall@20": val["Recall@20"]})
        if val[cfg.best_metric] > best:
            best, best_epoch, bad = val[cfg.best_metric], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    log.info("%s %s: best val %s %.4f at epoch %d of %d", cfg.model, variant, cfg.best_metric,
             best, best_epoch, len(history))
    model.load_state_dict(best_state)
    metrics, cands = rank_splits(model, ds, cfg, device)
    report = {"model": cfg.model, "variant": variant, "config": dataclasses.asdict(cfg),
              "val": metrics["val"], "test": metrics["test"], "best_epoch": best_epoch,
              "epochs_trained": len(history), "history": history,
              "num_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    weights = {k: v.detach().cpu().contiguous() for k, v in best_state.items()}
    atomic_write(out / "model.safetensors", lambda p: save_file(weights, str(p)))
    atomic_write(out / "candidates.parquet", lambda p: cands.to_parquet(p, index=False))
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(report, indent=1)))
    return report
