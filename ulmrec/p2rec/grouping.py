"""Pre-grouping (P2Rec §4.1.1): k-means over a trained retriever's item embeddings, and each
user's normalised interaction-frequency vector over the K groups (the SFT target).

Only training items count towards a user's vector: the validation and test items are what
every later model is scored on, so they must not leak into a target the LLM learns from.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans


def item_embeddings(retriever: torch.nn.Module) -> torch.Tensor:
    """The retriever's item table [N+1, d] (row 0 = padding), detached on CPU."""
    return retriever.item_emb.weight.detach().float().cpu().clone()


def kmeans_groups(emb: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """groups [N+1]: the k-means cluster of each item id, -1 for the padding row 0."""
    x = emb[1:].numpy()                                                           # [N, d]
    if k > len(x):
        raise ValueError(f"K={k} groups asked for but only {len(x)} items")
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return np.concatenate([[-1], labels]).astype(np.int64)


def frequency_vectors(sequences, groups: np.ndarray, k: int) -> np.ndarray:
    """[U, K] L1-normalised group counts of each sequence (pass TRAINING sequences only).
    L1 rather than L2 because the model's softmax output also sums to one (eq. 3)."""
    out = np.zeros((len(sequences), k), dtype=np.float32)
    for row, seq in enumerate(sequences):
        np.add.at(out[row], groups[np.asarray(seq, dtype=np.int64)], 1.0)
    sums = out.sum(1, keepdims=True)
    return out / np.maximum(sums, 1.0)


def user_targets(ds, groups: np.ndarray, k: int) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(users [U], training histories, targets [U, K]) for every user with a training item."""
    seqs = ds.sequences("train")
    seqs = seqs[seqs.map(len) > 0]
    hist = [list(s) for s in seqs]
    return seqs.index.to_numpy(np.int64), hist, frequency_vectors(hist, groups, k)
