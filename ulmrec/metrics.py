"""Ranking metrics with one relevant item per user (LlamaRec / ULMRec / RecBole agree).

rank r is 1-based; a target that is not in the list has rank = inf.
  Recall@k = [r <= k]      MRR@k = [r <= k] / r      NDCG@k = [r <= k] / log2(r + 1)
Ties are broken pessimistically: every other item with an equal score ranks above the target.

Two views of a two-stage (retrieve 20, then rank) system, paper §5.1.3:
  Rank    — mean over users whose target is among their retrieved candidates;
  Overall — mean over all users, a user whose target was not retrieved scoring 0
            (= Rank × retriever Recall@20 when every user has the same candidate count).
"""
from __future__ import annotations

import random

import numpy as np

KS = (5, 10, 20)


def target_ranks(scores, target_pos) -> np.ndarray:
    """Pessimistic 1-based rank of each user's target among their scored candidates.

    scores: [U, C] (higher is better; -inf marks excluded slots). target_pos: [U] column
    of the target in `scores`, or -1 when the target is not among the candidates.
    Returns float [U], inf where target_pos is -1 or the target's own score is -inf/NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    target_pos = np.asarray(target_pos, dtype=np.int64)
    if scores.ndim != 2 or target_pos.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [U, C] and target_pos [U]; got {scores.shape}, "
                         f"{target_pos.shape}")
    found = target_pos >= 0
    t = scores[np.arange(len(scores)), np.where(found, target_pos, 0)]            # [U]
    ahead = (scores >= t[:, None]).sum(axis=1)                                     # counts itself
    ranks = ahead.astype(np.float64)
    ranks[~found | ~np.isfinite(t)] = np.inf
    return ranks


def ranks_in_list(ranked_items, targets) -> np.ndarray:
    """1-based position of each user's target in their ranked item list [U, K]; inf if absent."""
    ranked_items = np.asarray(ranked_items)
    targets = np.asarray(targets)
    hit = ranked_items == targets[:, None]                                         # [U, K]
    pos = hit.argmax(axis=1) + 1.0
    return np.where(hit.any(axis=1), pos, np.inf)


def metrics_from_ranks(ranks, ks=KS) -> dict[str, float]:
    """Mean Recall@k, MRR@k, NDCG@k over the given users; keys like 'NDCG@10'."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return {f"{m}@{k}": 0.0 for k in ks for m in ("Recall", "MRR", "NDCG")}
    out = {}
    for k in ks:
        hit = r <= k
        out[f"Recall@{k}"] = float(hit.mean())
        out[f"MRR@{k}"] = float(np.where(hit, 1.0 / np.where(hit, r, 1.0), 0.0).mean())
        out[f"NDCG@{k}"] = float(ndcg_per_user(r, k).mean())
    return out


def ndcg_per_user(ranks, k: int) -> np.ndarray:
    """NDCG@k of each user from 1-based ranks (inf = not ranked): [U]."""
    r = np.asarray(ranks, dtype=np.float64)
    hit = r <= k
    return np.where(hit, 1.0 / np.log2(np.where(hit, r, 1.0) + 1.0), 0.0)


def rank_and_overall(ranks, retrieved, ks=(5, 10)) -> dict[str, dict[str, float]]:
    """The paper's two views of a ranker's results.

    ranks: [U] rank of the target among each user's candidates (inf if absent).
    retrieved: [U] bool, whether the target was among the user's retrieved candidates.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    retrieved = np.asarray(retrieved, dtype=bool)
    overall_ranks = np.where(retrieved, ranks, np.inf)
    return {
        "rank": metrics_from_ranks(ranks[retrieved], ks),
        "overall": metrics_from_ranks(overall_ranks, ks),
        "users": int(len(ranks)),
        "rank_users": int(retrieved.sum()),
        "retrieval_recall": float(retrieved.mean()) if len(ranks) else 0.0,
    }


def sample_eval_users(users, n: int, seed: int, block: int = 0) -> list[int]:
    """The n test users every evaluator draws (all, sorted, when n is 0 or too large): one
    rule, so that train.evaluate and train.lcrec score the same users with the same seed.
    block b > 0 takes the next n users of the same shuffled draw: disjoint from every other
    block, so that a result can be checked on a second sample."""
    pool = sorted(int(u) for u in users)
    if not n or n >= len(pool):
        if block:
            raise ValueError(f"block {block} of {n} users: there are only {len(pool)}")
        return pool
    if (block + 1) * n > len(pool):
        raise ValueError(f"block {block} of {n} users needs {(block + 1) * n}; there are {len(pool)}")
    rng = random.Random(seed)
    if block == 0:      # the draw every earlier table used
        return sorted(rng.sample(pool, n))
    order = rng.sample(pool, len(pool))
    first = set(sample_eval_users(users, n, seed))
    rest = [u for u in order if u not in first]
    return sorted(rest[(block - 1) * n: block * n])


def order_habits(scores) -> dict[str, float]:
    """How much a ranker copies its list's order, from its scores [U, K] of candidates in the
    list's order (the retriever's): the share of users whose top candidate is the list's first
    (letter A) and the mean Spearman correlation of its order with the list's (1 = the same)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return {"top_letter_a": 0.0, "spearman_with_retriever": 0.0}
    k = scores.shape[1]
    mine = (-scores).argsort(axis=1, kind="stable").argsort(axis=1)            # [U, K] 0 = top
    rho = 1 - 6 * ((mine - np.arange(k)[None]) ** 2).sum(axis=1) / (k * (k ** 2 - 1))
    return {"top_letter_a": float((mine[:, 0] == 0).mean()),
            "spearman_with_retriever": float(rho.mean())}
