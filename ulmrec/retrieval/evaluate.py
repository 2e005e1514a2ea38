"""Full-ranking evaluation over all items and the top-k candidate lists handed to the ranker.

A user's score vector covers every item; the padding id and every item of the user's whole
history are set to -inf first (so they can neither be recommended nor push the target down),
then the target's rank is taken pessimistically (ties count against it) and the top k kept.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ulmrec.metrics import metrics_from_ranks, ranks_in_list, target_ranks

from .data import pad_left


@torch.no_grad()
def masked_scores(model, histories: list[list[int]], max_len: int, device,
                  exclude: list[list[int]] | None = None) -> torch.Tensor:
    """Scores [B, num_items + 1] of the next item after each history; seen items, id 0 and
    each row's `exclude` items (not read as input) at -inf."""
    inputs = pad_left([h[-max_len:] for h in histories]).to(device)                # [B, L]
    scores = model.score(model.encode(inputs)[:, -1]).float()                       # [B, N+1]
    masked = [h + (exclude[b] if exclude is not None else []) for b, h in enumerate(histories)]
    rows = torch.repeat_interleave(torch.arange(len(masked)), torch.tensor([len(m) for m in masked]))
    cols = torch.tensor([i for m in masked for i in m], dtype=torch.long)
    scores[rows.to(device), cols.to(device)] = -torch.inf                          # whole history
    scores[:, 0] = -torch.inf
    return scores


@torch.no_grad()
def full_rank(model, histories: list[list[int]], targets: np.ndarray, max_len: int,
              batch_size: int = 128, k: int = 20, device="cpu", desc: str = "eval",
              exclude: list[list[int]] | None = None) -> dict:
    """ranks [U] of each target among all unseen items, plus the top-k items [U, k] and scores.
    `exclude[u]`: further items never ranked for user u (e.g. the user's later items)."""
    was_training = model.training
    model.eval()
    # batches of similar length need little padding; results go back to the callers' order
    order = np.argsort([min(len(h), max_len) for h in histories], kind="stable")
    ranks, top_items, top_scores = [], [], []
    for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[i:i + batch_size]
        scores = masked_scores(model, [histories[j] for j in idx], max_len, device,
                               None if exclude is None else [exclude[j] for j in idx])
        ranks.append(target_ranks(scores.cpu().numpy(), targets[idx]))
        s, items = torch.topk(scores, k, dim=1)
        if not torch.isfinite(s).all():
            raise ValueError(f"some user has fewer than {k} unseen items: cannot list {k} candidates")
        top_items.append(items.cpu().numpy())
        top_scores.append(s.cpu().numpy())
    model.train(was_training)
    back = np.argsort(order)
    return {"ranks": np.concatenate(ranks)[back], "items": np.concatenate(top_items)[back],
            "scores": np.concatenate(top_scores)[back]}


def summarize(result: dict, targets: np.ndarray, ks=(5, 10, 20)) -> dict:
    """Full-ranking metrics plus the candidate list's own recall (the ranker's ceiling)."""
    out = metrics_from_ranks(result["ranks"], ks)
    in_list = ranks_in_list(result["items"], targets) <= result["items"].shape[1]
    out[f"candidates_Recall@{result['items'].shape[1]}"] = float(in_list.mean())
    out["users"] = int(len(targets))
    return out


def candidate_frame(users: np.ndarray, split: str, targets: np.ndarray, result: dict) -> pd.DataFrame:
    """One row per user: the top-k candidates in score order with their scores."""
    items, scores = result["items"], result["scores"]
    return pd.DataFrame({
        "user": users.astype(np.int64),
        "split": split,
        "target": targets.astype(np.int64),
        "candidates": [row.astype(np.int64).tolist() for row in items],
        "scores": [row.astype(np.float64).tolist() for row in scores],
        "target_in_candidates": (items == targets[:, None]).any(1),
    })
