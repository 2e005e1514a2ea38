"""LC-Rec's alignment tasks (§III-C) as (instruction, input, response) examples.

  seq  index history → next item's index                  (sequential recommendation)
  mut  title (+ description) → index, and index → title     (mutual item alignment)
  asy  index history → next item's title; title history → next item's index  (implicit)
  ite  user intent → index of the item it led to            (only where intents exist)
  per  index history → the user's preference text           (only where preferences exist)

One template is sampled per training example; evaluation uses the first SEQ template.
Leakage rule as in ulmrec.tasks: user-side examples come from the training part of each
sequence only; validation / test items are only ever evaluation targets. `mut` is item-side
(the catalogue is known in advance) and has no user.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..prompts import shorten
from ..tasks import Example
from .item_index import item_texts

TEMPLATES = {
    "seq": [
        "Here are the items a user interacted with, in chronological order: {history}. "
        "Predict the next item the user will interact with.",
        "The user's purchase history, oldest first: {history}. Which item comes next?",
        "Given the interaction sequence {history}, recommend the next item for this user.",
    ],
    "mut_title_to_index": [
        "Which item has the title \"{title}\"?",
        "Give the index of the item described as: {title}",
        "Map this item to its index: {title}",
    ],
    "mut_index_to_title": [
        "What is the title of item {index}?",
        "Describe item {index} by its title.",
        "Item {index}: what is it called?",
    ],
    "asy_index_to_title": [
        "A user interacted with {history}, in this order. What is the title of the next item?",
        "Given the history {history}, name the item the user will buy next.",
    ],
    "asy_title_to_index": [
        "A user bought these items in order: {history}. Predict the index of the next item.",
        "History (titles, oldest first): {history}. Which item comes next?",
    ],
    "ite": [
        "A user says: \"{intent}\" Which item should be recommended?",
        "Recommend an item matching this need: {intent}",
    ],
    "per": [
        "A user interacted with {history}, in this order. Describe the user's preferences.",
        "From the history {history}, what does this user like?",
    ],
}
TASKS = ("seq", "mut", "asy", "ite", "per")


@dataclass
class LcRecData:
    """What the prompts may show; every user-side field comes from training sequences."""
    index: dict[int, str]             # item → '<a_1><b_2><c_3><d_4>'
    titles: dict[int, str]            # item → (shortened) title
    texts: dict[int, str]             # item → title + description (mut)
    train: pd.Series                  # user → chronological training items
    preference: pd.Series | None = None
    intent: pd.Series | None = None


def lcrec_data(ds, index: dict[int, str], preference=None, intent=None,
               max_title_words: int = 16) -> LcRecData:
    ids, texts = item_texts(ds)
    titles = {int(i): shorten(str(t), max_title_words) for i, t in zip(ds.items["item"], ds.items["title"])}
    return LcRecData(index=index, titles=titles,
                     texts={int(i): shorten(t, 48) for i, t in zip(ids, texts)},
                     train=ds.sequences("train"), preference=preference, intent=intent)


def _pick(rng: random.Random | None, key: str) -> str:
    return TEMPLATES[key][0] if rng is None else rng.choice(TEMPLATES[key])


def _ex(task: str, user: int, instruction: str, response: str, target: int | None = None) -> Example:
    # The whole prompt is the instruction (LC-Rec templates inline their inputs)
    return Example(task, user, instruction, "", response, None, target)


def seq_example(data: LcRecData, user: int, history: list[int], target: int | None,
                max_history: int, rng: random.Random | None = None) -> Example:
    """target None → an inference prompt (response empty)."""
    hist = ", ".join(data.index[i] for i in history[-max_history:])
    return _ex("seq", user, _pick(rng, "seq").format(history=hist),
               data.index[target] if target is not None else "", target)


def _text(v) -> str | None:
    return v.strip() if isinstance(v, str) and v.strip() else None


def training_examples(data: LcRecData, tasks=TASKS, max_history: int = 20,
                      max_prefixes_per_user: int = 0, users=None, seed: int = 42) -> list[Example]:
    """All examples of `tasks` (for `users`, default all), shuffled."""
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown LC-Rec task(s) {sorted(unknown)}; known: {TASKS}")
    rng = random.Random(seed)
    out: list[Example] = []
    train = data.train if users is None else data.train[data.train.index.isin(list(users))]
    for user, seq in train.items():
        user = int(user)
        ends = list(range(len(seq) - 1, 0, -1))          # newest prefix first
        if max_prefixes_per_user:
            ends = ends[:max_prefixes_per_user]
        for end in ends:
            history, target = seq[:end], seq[end]
            if "seq" in tasks:
                out.append(seq_example(data, user, history, target, max_history, rng))
        if "asy" in tasks and len(seq) >= 2:
            history, target = seq[:-1][-max_history:], seq[-1]
            out.append(_ex("asy", user, _pick(rng, "asy_index_to_title").format(
                history=", ".join(data.index[i] for i in history)), data.titles[target], target))
            out.append(_ex("asy", user, _pick(rng, "asy_title_to_index").format(
                history="; ".join(data.titles[i] for i in history)), data.index[target], target))
        if "per" in tasks and data.preference is not None:
            pref = _text(data.preference.get(user))
            if pref:
                out.append(_ex("per", user, _pick(rng, "per").format(
                    history=", ".join(data.index[i] for i in seq[-max_history:])), pref))
        if "ite" in tasks and data.intent is not None:
            intent = _text(data.intent.get(user))
            if intent:  # the intent was written from training reviews: it points at the last one
                out.append(_ex("ite", user, _pick(rng, "ite").format(intent=intent),
                               data.index[seq[-1]], seq[-1]))
    if "mut" in tasks:
        for item in sorted(data.index):
            out.append(_ex("mut", -1, _pick(rng, "mut_title_to_index").format(title=data.texts[item]),
                           data.index[item], item))
            out.append(_ex("mut", -1, _pick(rng, "mut_index_to_title").format(index=data.index[item]),
                           data.titles[item], item))
    rng.shuffle(out)
    return out


def eval_examples(ds, data: LcRecData, split: str, max_history: int = 20, users=None
                  ) -> tuple[list[Example], list[list[int]]]:
    """SEQ prompts for `split` ('val': history = train; 'test': history = train + val), and
    each user's full history (items to keep out of the generated list)."""
    hist = ds.sequences("train" if split == "val" else "val")
    targets = ds.targets(split)
    chosen = targets.index if users is None else [u for u in users if u in targets.index]
    exs, histories = [], []
    for user in chosen:
        h = [int(i) for i in hist[user]]
        exs.append(seq_example(data, int(user), h, int(targets[user]), max_history))
        histories.append(h)
    return exs, histories


def sample_users(ds, n: int, seed: int = 0) -> list[int] | None:
    """n users drawn at random (sorted), or None for all users when n is 0."""
    users = ds.users["user"].to_numpy()
    if not n or n >= len(users):
        return None
    return sorted(np.random.default_rng(seed).choice(users, n, replace=False).tolist())
