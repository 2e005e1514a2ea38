"""Index tokens that start with a meaning: each new `<a_k>`/`<b_k>`/… embedding row begins at
the backbone's own embedding of the words that set that code's users apart.

A fresh row drawn around the mean embedding looks like every other index token, so a short
run learns to ignore the codes and writes the same preference for every user (measured on
games: 1,200 steps, 1% distinct texts). Starting `<a_31>` near "rpg · playstation · action"
lets the first steps already condition on it; training then refines the rows as before.
Only the training users' preference texts are read (the same texts index_to_pref trains on).
"""
from __future__ import annotations

import math
import re
from collections import Counter

import pandas as pd
import torch

from .indexing.table import level_letter, parse_token_string

WORD = re.compile(r"[a-z][a-z0-9'+-]{2,}")


def _stop_words() -> frozenset[str]:
    # sklearn is imported on first use: it costs ~2.5 s, for one word list
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    return frozenset(ENGLISH_STOP_WORDS) | {"user", "users", "prefers", "preference", "preferences",
                                            "enjoys", "interest", "interested", "particularly"}


def code_words(index: pd.Series, texts: pd.Series, top: int = 8) -> dict[str, list[tuple[str, float]]]:
    """index token (e.g. '<b_7>') → up to `top` (word, weight): the words whose share among
    the texts of the users carrying that code at that level most exceeds their share overall
    (weight = share_in_group · log(share_in_group / share_overall))."""
    stop = _stop_words()
    users = [u for u in index.index if isinstance(texts.get(u), str) and texts.get(u).strip()]
    words = {u: {w for w in WORD.findall(texts[u].lower()) if w not in stop} for u in users}
    df = Counter(w for u in users for w in words[u])
    n = max(1, len(users))
    groups: dict[str, list] = {}
    for u in users:
        for level, code in enumerate(parse_token_string(index[u])):
            groups.setdefault(_token(level, code), []).append(u)
    out = {}
    for token, members in groups.items():
        counts = Counter(w for u in members for w in words[u])
        m = len(members)
        scored = []
        for w, c in counts.items():
            if m >= 4 and c < 2:        # a word of one user is not what a group shares
                continue
            p, q = c / m, df[w] / n
            scored.append((w, p * math.log(p / q)))
        scored.sort(key=lambda x: (-x[1], x[0]))
        out[token] = [(w, s) for w, s in scored[:top] if s > 0]
    return out


def _token(level: int, code: int) -> str:
    return f"<{level_letter(level)}_{code}>"


@torch.no_grad()
def init_index_rows(model, tokenizer, words: dict[str, list[tuple[str, float]]]) -> int:
    """Set each index token's input-embedding row to the weighted mean of its words' embeddings
    (a word = the mean of its sub-word rows), rescaled to the vocabulary's mean row norm.
    Returns how many rows were set; tokens without words keep their row."""
    emb = model.get_input_embeddings().weight            # [V, D]
    norm = emb.norm(dim=1).mean()
    done = 0
    for token, scored in words.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id or not scored:
            continue
        vecs, weights = [], []
        for w, s in scored:
            ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            if ids:
                vecs.append(emb[ids].mean(0))
                weights.append(s)
        if not vecs:
            continue
        wt = torch.tensor(weights, dtype=emb.dtype, device=emb.device)
        row = (torch.stack(vecs) * wt[:, None]).sum(0) / wt.sum()
        emb[tid] = row * (norm / row.norm().clamp_min(1e-8))
        done += 1
    return done
