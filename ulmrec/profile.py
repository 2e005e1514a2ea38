"""What the users behind an index prefix have in common, from the data alone (no model).

For a prefix such as `<a_12><b_3>`: how many users share it, their most frequent training
items (titles, with how many of those users had each), the title keyphrases that are most
over-represented among them compared with all users (with counts), and a sample of their
reference preferences. The app shows it beside each rung of the decoding ladder, so the
generated text can be checked against facts; `bench.decode` writes it for its example
ladders.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .indexing.table import parse_token_string, token_string
from .preferences.extractive import phrase_analyzer


@dataclass
class PrefixProfile:
    prefix: str
    users: int                                   # users sharing the prefix
    share: float                                 # of all users
    titles: list[tuple[str, int]]                # (title, users of the group who had it)
    phrases: list[tuple[str, int]]               # (title keyphrase, users of the group)
    preferences: list[str]                       # a sample of their reference preferences

    def text(self, n_titles: int = 3, n_phrases: int = 4, n_prefs: int = 1) -> str:
        """One plain-text cell: '14 users (3%) · top items: A (9), B (5) · … · e.g. "…"'."""
        parts = [f"{self.users} user{'s' if self.users != 1 else ''} ({self.share:.1%})"]
        if self.titles[:n_titles]:
            parts.append("top items: " + "; ".join(f"{t} ({c})" for t, c in self.titles[:n_titles]))
        if self.phrases[:n_phrases]:
            parts.append("keyphrases: " + ", ".join(f"{p} ({c})" for p, c in self.phrases[:n_phrases]))
        for pref in self.preferences[:n_prefs]:
            parts.append(f'e.g. "{pref}"')
        return " · ".join(parts)

    def as_dict(self) -> dict:
        return {"prefix": self.prefix, "users": self.users, "share": self.share,
                "titles": [list(t) for t in self.titles], "phrases": [list(p) for p in self.phrases],
                "preferences": list(self.preferences)}


@dataclass
class ProfileIndex:
    """Users' codes and training items, prepared once; `profile(prefix)` per request."""
    codes: np.ndarray                            # [U, L] int codes, one row per user
    items: list[list[int]]                       # per user row: training item ids
    titles: dict[int, str]
    preferences: list[str | None]                # per user row
    item_phrases: dict[int, frozenset[str]] = field(default_factory=dict)
    phrase_users: Counter = field(default_factory=Counter)   # phrase → users (all) having it

    @classmethod
    def build(cls, index_strings, items, titles: dict[int, str], preferences=None
              ) -> "ProfileIndex":
        """index_strings [U] ('<a_1><b_2>…'), items [U] lists of training item ids, titles
        item → title, preferences [U] texts or None."""
        codes = [parse_token_string(str(s)) for s in index_strings]
        width = max((len(c) for c in codes), default=0)
        mat = np.full((len(codes), width), -1, dtype=np.int64)
        for i, c in enumerate(codes):
            mat[i, :len(c)] = c
        items = [[int(i) for i in seq] for seq in items]
        used = {i for seq in items for i in seq}
        item_phrases = {i: frozenset(phrase_analyzer(str(titles.get(i, "")))) for i in used}
        phrase_users: Counter = Counter()
        for seq in items:
            phrase_users.update(frozenset().union(*(item_phrases[i] for i in seq)) if seq else ())
        prefs = list(preferences) if preferences is not None else [None] * len(codes)
        return cls(mat, items, dict(titles), prefs, item_phrases, phrase_users)

    def members(self, prefix: str | list[int]) -> np.ndarray:
        """Row positions of the users whose index starts with `prefix`."""
        want = parse_token_string(prefix) if isinstance(prefix, str) else list(prefix)
        if not want or len(want) > self.codes.shape[1]:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero((self.codes[:, :len(want)] == np.asarray(want)[None, :]).all(axis=1))

    def profile(self, prefix: str, n_titles: int = 5, n_phrases: int = 8, n_prefs: int = 3
                ) -> PrefixProfile:
        rows = self.members(prefix)
        n_all = max(1, len(self.items))
        item_users: Counter = Counter()
        phrase_users: Counter = Counter()
        for r in rows:
            seq = set(self.items[r])
            item_users.update(seq)
            phrase_users.update(frozenset().union(*(self.item_phrases[i] for i in seq)) if seq else ())
        titles = [(self.titles.get(i, str(i)), c) for i, c in
                  sorted(item_users.items(), key=lambda kv: (-kv[1], kv[0]))[:n_titles]]
        # keyphrases: shared by ≥ 2 users of the group (or the one user) and more common in
        # the group than overall (lift), ranked by how many more users have it than expected
        floor = 2 if len(rows) > 1 else 1
        scored = []
        for p, c in phrase_users.items():
            expected = len(rows) * self.phrase_users[p] / n_all
            if c >= floor and c > expected:
                scored.append((c - expected, c, p))
        scored.sort(key=lambda t: (-t[0], -t[1], t[2]))
        phrases = _drop_contained([(p, c) for _, c, p in scored], n_phrases)
        phrases.sort(key=lambda pc: -pc[1])          # shown by count, most shared first
        prefs = [self.preferences[r] for r in rows
                 if isinstance(self.preferences[r], str) and self.preferences[r].strip()]
        canon = token_string(parse_token_string(prefix))
        return PrefixProfile(canon, int(len(rows)), len(rows) / n_all, titles, phrases,
                             prefs[:n_prefs])


def _drop_contained(phrases: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    """Top n phrases, skipping a unigram already inside a kept bigram with the same count."""
    out: list[tuple[str, int]] = []
    for p, c in phrases:
        if any(c == kc and (p in k.split() or k in p.split()) for k, kc in out):
            continue
        out.append((p, c))
        if len(out) == n:
            break
    return out
