"""Information augmentation (P2Rec §4.2) and the Fig. 5 agreement with the pre-grouping.

Each item is fed alone, as a one-item "virtual user": the knowledge embedding of eq. 2 is the
item's enhanced embedding and eq. 3's output its inferred group distribution.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .llm import P2RecLM


@torch.no_grad()
def enhance_items(model: P2RecLM, num_items: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(enhanced embeddings [N+1, D], group distributions [N+1, K]); row 0 (padding) is zero."""
    model.eval()
    embs, probs = [], []
    for start in tqdm(range(1, num_items + 1, batch_size), desc="enhance items", unit="batch",
                      leave=False):
        ids = range(start, min(start + batch_size, num_items + 1))
        h, p = model([[i] for i in ids])
        embs.append(h.cpu())
        probs.append(p.cpu())
    emb, prob = torch.cat(embs), torch.cat(probs)
    return (torch.cat([emb.new_zeros(1, emb.shape[1]), emb]),
            torch.cat([prob.new_zeros(1, prob.shape[1]), prob]))


def agreement(groups: np.ndarray, probs: np.ndarray) -> dict:
    """Fig. 5 cases over items 1..N: C1 the most probable inferred group is the pre-group;
    C2 the pre-group is 2nd or 3rd (in the top 3 but not first); C3 neither. Shares sum to 1."""
    g = groups[1:]
    p = probs[1:]
    top3 = np.argsort(-p, axis=1, kind="stable")[:, :3]                         # [N, 3]
    c1 = top3[:, 0] == g
    c2 = (top3 == g[:, None]).any(1) & ~c1
    n = len(g)
    return {"items": int(n), "C1": float(c1.mean()), "C2": float(c2.mean()),
            "C3": float(1.0 - c1.mean() - c2.mean()),
            "groups_used_pre": len(np.unique(g)),
            "groups_used_inferred": len(np.unique(top3[:, 0]))}
