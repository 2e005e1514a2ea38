"""A prefix trie over the token ids of the valid item indices.

LC-Rec's released code only restricts *which level's* tokens may come at each position, so
a beam can spell <a_3><b_9><c_1><d_7> although no item has that index. Here every prefix
maps to the tokens that extend it towards at least one real item, so a constrained beam
can only ever spell an existing item.
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pandas as pd

from ..indexing.table import level_letter, parse_token_string


def item_token_ids(tok, table: pd.DataFrame) -> dict[tuple[int, ...], int]:
    """token-id tuple of each item's index (one added token per level) → item id."""
    out: dict[tuple[int, ...], int] = {}
    for item, s in zip(table["item"].astype(int).tolist(), table["index"].tolist()):
        codes = parse_token_string(s)
        tokens = [f"<{level_letter(lv)}_{c}>" for lv, c in enumerate(codes)]
        ids = tuple(tok.convert_tokens_to_ids(tokens))
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise ValueError(f"item {item}: index {s} has tokens missing from the vocabulary "
                             "(add_index_tokens first)")
        out[ids] = item
    return out


def prefix_counts(sequences) -> Counter:
    """How many of the sequences start with each prefix (the empty prefix included)."""
    counts: Counter = Counter()
    for seq in sequences:
        seq = tuple(int(t) for t in seq)
        for depth in range(len(seq) + 1):
            counts[seq[:depth]] += 1
    return counts


def build_trie(sequences) -> dict[tuple[int, ...], dict[int, int]]:
    """Token-id sequences (all the same length) → {prefix: {allowed next id: how many items lie
    below it}}; the empty prefix () holds the first tokens."""
    trie: dict[tuple[int, ...], dict[int, int]] = defaultdict(dict)
    for prefix, n in prefix_counts(sequences).items():
        if prefix:
            trie[prefix[:-1]][prefix[-1]] = n
    return {p: dict(sorted(d.items())) for p, d in trie.items()}


def allowed(trie: dict, prefix, banned: Counter | None = None) -> list[int]:
    """Tokens that may follow `prefix`. With `banned` (prefix_counts of items to leave out,
    e.g. the user's history) a token is allowed only if some item below it is not banned, so
    a beam never walks into a branch that holds nothing but banned items. [] when nothing
    can follow."""
    prefix = tuple(int(t) for t in prefix)
    options = trie.get(prefix, {})
    if not banned:
        return list(options)
    return [t for t, n in options.items() if n > banned.get(prefix + (t,), 0)]


def prefix_fn(trie: dict, prompt_width: int, fallback_id: int, banned: list | None = None):
    """`prefix_allowed_tokens_fn` for generate on left-padded prompts of width `prompt_width`:
    every row's generated tokens start at that column. `banned`: per prompt, the token-id
    sequences of items never to generate. When no valid token exists (only if a prompt bans
    the whole catalogue) only `fallback_id` is allowed; such a beam spells no item and is
    dropped when the results are read."""
    counts = [prefix_counts(b) for b in banned] if banned else None

    def fn(batch_id: int, sent) -> list[int]:
        generated = sent[prompt_width:].tolist()                  # [t] tokens so far
        options = allowed(trie, generated, counts[batch_id] if counts else None)
        return options or [fallback_id]
    return fn
