"""Retriever prior fusion (beyond the paper): re-rank the 20 candidates by

    score = log p_LLM(letter) + λ · log softmax(retriever scores over the 20)

λ = 0 is the LLM alone, λ → ∞ the retriever's own order. The LLM and the retriever err on
different users, so a fitted λ can beat both parents. λ is chosen on validation users only
(grid search on Rank NDCG@10), never on the test users it is reported on.
"""
from __future__ import annotations

import numpy as np

from .metrics import ndcg_per_user, target_ranks

# fine near 0 (the LLM leads), coarse far out (the retriever leads, the LLM breaks its ties)
LAMBDAS = tuple(np.round(np.concatenate([np.arange(0, 1, 0.1), np.arange(1, 5, 0.25),
                                         [5, 6, 8, 10, 15, 20, 30, 50]]), 3))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def letter_log_probs(llm_probs: np.ndarray) -> np.ndarray:
    """log of letter probabilities [U, K], a zero probability floored instead of -inf."""
    return np.log(np.clip(np.asarray(llm_probs, dtype=np.float64), 1e-30, None))


def fuse(llm_probs: np.ndarray, retriever_scores: np.ndarray, lam: float) -> np.ndarray:
    """Fused scores [U, K] from letter probabilities [U, K] and the retriever's scores [U, K]
    (both in the candidates' letter order)."""
    retr = log_softmax(np.asarray(retriever_scores, dtype=np.float64))
    return letter_log_probs(llm_probs) + lam * retr


def rank_ndcg(scores: np.ndarray, target_pos: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of the target (pessimistic ties) under `scores` [U, K]."""
    return ndcg_per_user(target_ranks(scores, target_pos), k)


def fit_lambda(llm_probs, retriever_scores, target_pos, grid=LAMBDAS, k: int = 10) -> dict:
    """The λ of `grid` with the best mean NDCG@k on these (validation) users; ties → smaller λ.
    Returns {"lambda", "val_ndcg", "val_users", "curve": {λ: NDCG}}."""
    target_pos = np.asarray(target_pos)
    if len(target_pos) == 0:
        raise ValueError("no validation users to fit the fusion weight on")
    curve = {float(lam): float(rank_ndcg(fuse(llm_probs, retriever_scores, lam), target_pos, k).mean())
             for lam in grid}
    best = max(curve, key=lambda lam: (curve[lam], -lam))
    return {"lambda": best, "val_ndcg": curve[best], "val_users": int(len(target_pos)),
            "curve": curve}


def fit_residual_weight(retriever_scores: list[list[float]], target_pos, grid=LAMBDAS) -> dict:
    """w of the residual ranker (ulmrec.model.response_loss): the retriever's temperature by
    maximum likelihood, argmax_w mean log softmax(w · log-softmax(scores))[target], on lists
    that hold their target (validation lists: held-out targets, as at test time). The residual model then starts from the
    retriever's calibrated order and its LLM term learns the corrections.
    Returns {"weight", "log_likelihood", "lists", "curve"}."""
    pos = np.asarray(target_pos)
    if len(pos) == 0:
        raise ValueError("no lists with their target to fit the residual weight on")
    retr = log_softmax(np.asarray(retriever_scores, dtype=np.float64))          # [U, K]
    rows = np.arange(len(pos))
    curve = {float(w): float(log_softmax(w * retr)[rows, pos].mean()) for w in grid}
    best = max(curve, key=lambda w: (curve[w], -w))
    return {"weight": best, "log_likelihood": curve[best], "lists": int(len(pos)), "curve": curve}


def ranked_scores(scores, probs, retriever_scores, residual_weight: float | None) -> np.ndarray:
    """[U, K] what a run ranks its candidates by: its letter scores, or for a residual run
    (residual_weight set) the sum it was trained as, log p_LLM + w · log-softmax(retriever)."""
    if residual_weight is None:
        return np.asarray(scores)
    return fuse(probs, retriever_scores, residual_weight)
