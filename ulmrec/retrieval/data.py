"""Training windows and padded batches for next-item retrieval.

Training uses the train part of each sequence only (val/test items never appear as inputs or
targets). A sequence of n items gives n-1 next-item targets; longer than max_len + 1, it is cut
into windows of up to max_len targets from the end, each target appearing exactly once with up to
max_len preceding items as context (LlamaRec's sliding window with step = max_len).
"""
from __future__ import annotations

import numpy as np
import torch


def train_windows(seqs: list[list[int]], max_len: int) -> list[list[int]]:
    """Each window w is trained as inputs w[:-1] → targets w[1:] (len(w) ≤ max_len + 1)."""
    out = []
    for seq in seqs:
        end = len(seq)
        while end > 1:
            start = max(0, end - max_len - 1)
            out.append(seq[start:end])
            end = start + 1                           # next window's last target precedes this one's first
    return out


def pad_left(rows: list[list[int]], length: int | None = None) -> torch.Tensor:
    """Left-pad item lists with 0 to a common length (the longest row by default) → [B, L]."""
    length = length or max(len(r) for r in rows)
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        r = r[-length:]
        if r:
            out[i, length - len(r):] = r
    return torch.from_numpy(out)


def batch_order(windows: list[list[int]], batch_size: int, seed: int, epoch: int,
                pool_batches: int = 32) -> list[list[int]]:
    """Window indices of each training batch of an epoch.

    Windows are shuffled, sorted by length within pools of `pool_batches` batches, and the
    batches shuffled again: batches stay random but need little padding (most histories are
    short, and a batch costs as much as its longest window). The order depends only on
    (seed, epoch), so a resumed run sees the very batches it would have seen anyway.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(windows), generator=g).tolist()
    pool = batch_size * pool_batches
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i:i + pool], key=lambda j: len(windows[j]))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=g).tolist()]


def collate(windows: list[list[int]], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, L], targets [B, L]) of a batch; a target counts only where its input is an
    item (input 0 = padding, target 0 = padding)."""
    padded = pad_left([windows[j] for j in idx])                                    # [B, L+1]
    return padded[:, :-1], padded[:, 1:]


def eval_histories(ds, split: str) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """(users [U], histories, targets [U]) for 'val' (history = train part), 'test'
    (history = train + val part) or 'train' (the last training item from the ones before
    it: the ranker's hard training candidates, as LlamaRec trains; see later_items)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if split == "train":
        seqs = ds.sequences("train")
        seqs = seqs[seqs.map(len) >= 2]
        hist, targets = seqs.map(lambda s: s[:-1]), seqs.map(lambda s: s[-1])
    else:
        hist = ds.sequences("train" if split == "val" else "val")
        targets = ds.targets(split)
    users = np.array(sorted(set(hist.index) & set(targets.index)), dtype=np.int64)
    if len(users) == 0:
        raise ValueError(f"{ds.name}: no user has both a history and a {split} target")
    return users, [list(hist[u]) for u in users], targets.loc[users].to_numpy(np.int64)


def later_items(ds, users: np.ndarray) -> list[list[int]]:
    """Each user's validation and test items: kept out of the 'train' split's candidate lists,
    where they would teach the ranker that the item the user buys next is a wrong answer."""
    full, train = ds.sequences("test"), ds.sequences("train")
    return [[int(i) for i in full[u][len(train[u]):]] for u in users]
