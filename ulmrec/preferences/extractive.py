"""Extractive, model-free preference summary: the fallback that always completes.

From a user's training interactions it takes the highly rated ones (rating ≥ 4; all of
them where ratings are unknown, as on the release split), and names their most common
category and brands plus the keyphrases (1–2 word n-grams of titles and reviews) that are
most specific to this user by tf-idf across all users. Items rated ≤ 2 are named as
dislikes. The sentence follows the authors' form ("The user prefers …") so it can stand
in for a generated one.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterator

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

from .prompt import Prompt, user_histories

LIKED, DISLIKED = 4.0, 2.0
# Review-site filler ("Five Stars" is the default review summary) and rating words.
STOP = ENGLISH_STOP_WORDS | {"star", "stars", "one", "two", "three", "four", "five", "great",
                             "good", "nice", "love", "loved", "like", "product", "item",
                             "buy", "bought", "purchase", "purchased", "thanks", "works",
                             "recommend", "excellent", "awesome", "best", "just", "really",
                             "did", "does", "got", "get", "use", "used", "ok", "okay"}
_FRAGMENT = re.compile(r"[.!?,;:()\[\]\n\-–—/|\"]+")
_WORD = re.compile(r"[a-z0-9][a-z0-9'&+]*[a-z0-9+]|[a-z]")


def phrase_analyzer(doc: str) -> list[str]:
    """Unigrams and bigrams that never span punctuation and contain no stopword."""
    out = []
    for frag in _FRAGMENT.split(doc.lower()):
        words = [w for w in _WORD.findall(frag)]
        keep = [len(w) >= 3 and w not in STOP for w in words]
        out += [w for w, k in zip(words, keep) if k]
        out += [f"{a} {b}" for (a, ka), (b, kb) in zip(zip(words, keep), zip(words[1:], keep[1:]))
                if ka and kb]
    return out


def _liked(h: pd.DataFrame) -> pd.DataFrame:
    rated = h["rating"].notna()
    return h[~rated | (h["rating"] >= LIKED)] if (h["rating"] >= LIKED).any() or not rated.any() else h


def _user_doc(h: pd.DataFrame) -> str:
    texts = h["title"].tolist() + h.loc[h["text_kind"] == "review", "text"].tolist()
    return " . ".join(str(t) for t in texts)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class ExtractiveBackend:
    """Holds the per-dataset tf-idf vocabulary, so it is fitted once: real state."""

    name = "extractive"
    model_id = "tfidf-v1"
    settings: dict = {}

    def __init__(self, ds, n_phrases: int = 3, n_brands: int = 2):
        self.n_phrases, self.n_brands = n_phrases, n_brands
        self.histories = user_histories(ds)
        items = ds.items.set_index("item")
        self.category = (items["category"].fillna("").str.split(">").str[-1].str.strip()
                         if "category" in items else pd.Series("", index=items.index))
        self.brand = (items["brand"].fillna("").str.strip() if "brand" in items
                      else pd.Series("", index=items.index))
        users = sorted(self.histories)
        docs = [_user_doc(_liked(self.histories[u])) for u in users]
        self.vec = TfidfVectorizer(analyzer=phrase_analyzer, min_df=2, sublinear_tf=True)
        self.tfidf = self.vec.fit_transform(docs)  # [U, V] sparse
        self.row = {u: i for i, u in enumerate(users)}
        self.vocab = np.asarray(self.vec.get_feature_names_out())

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def phrases(self, user: int, exclude: list[str] = ()) -> list[str]:
        row = self.tfidf[self.row[user]]
        order = np.argsort(-row.data, kind="stable")
        picked: list[str] = []
        used = {w for e in exclude for w in _WORD.findall(e.lower())}
        for j in row.indices[order]:
            p = self.vocab[j]
            if used & set(p.split()):  # no phrase repeats a word already said
                continue
            picked.append(p)
            used |= set(p.split())
            if len(picked) == self.n_phrases:
                break
        return picked

    def summarize(self, user: int, task: str = "preference") -> str:
        h = self.histories.get(user)
        if h is None or h.empty:
            raise ValueError(f"user {user} has no training interactions")
        liked = _liked(h)
        cats = Counter(c for c in self.category.reindex(liked["item"]).tolist() if c)
        brands = [b for b, _ in Counter(b for b in self.brand.reindex(liked["item"]).tolist()
                                        if b).most_common(self.n_brands)]
        what = cats.most_common(1)[0][0].lower() if cats else "items"
        if task == "intent":  # the newest liked item is the best single guess of what's next
            return f"The user is looking for more {what} like {liked.iloc[0]['title'][:80].strip()}."
        text = f"The user prefers {what}"
        if brands:
            text += f" from {_join(brands)}"
        phrases = self.phrases(user, exclude=brands + [what])
        if phrases:
            text += f", with interest in {_join(phrases)}"
        text += "."
        disliked = h[h["rating"] <= DISLIKED]
        if len(disliked):
            text += f" They disliked {disliked.iloc[0]['title'][:80].strip()}."
        return text

    def generate(self, prompts: list[Prompt]) -> Iterator[tuple[Prompt, str | Exception]]:
        for p in prompts:
            try:
                yield p, self.summarize(p.user, p.task)
            except Exception as err:  # noqa: BLE001
                yield p, err


def summaries(ds, task: str = "preference") -> pd.Series:
    """user → the extractive text of every user, in memory (nothing written): what a bundle
    shows when this machine has no extracted preferences. A user with no training
    interaction gets ''."""
    backend = ExtractiveBackend(ds)

    def one(user: int) -> str:
        try:
            return backend.summarize(user, task).strip()
        except ValueError:
            return ""
    users = sorted(int(u) for u in ds.users["user"])
    return pd.Series([one(u) for u in users], index=users, name=task)
