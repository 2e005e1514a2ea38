"""The six alignment tasks of ULMRec (§4.2) as (instruction, input, response) examples.

Leakage rule: every training example is built from the *training* part of a sequence;
validation/test targets only appear as evaluation targets. Next-item training examples
are all prefixes of the training sequence (target = the next training item, candidates =
target + random negatives outside the history, shuffled), as LlamaRec trains; evaluation
uses the retriever's top-20 in retriever order.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .item_tokens import item_token
from .prompts import (INSTRUCTIONS, LETTERS, TASKS, candidates_block, history_line,
                      sentence_ends, shorten)

INDEX_KINDS = ("pid", "release", "nid", "oid", "none")
INDEX_TASKS = ("index_to_pref", "pref_to_index", "history_to_index")


@dataclass
class TaskConfig:
    """Which tasks, in what proportion, and what the prompts show."""
    tasks: tuple[str, ...] = field(default=TASKS, metadata={"help": f"subset of {TASKS}"})
    task_ratio: tuple[float, ...] = field(default=(), metadata={
        "nargs": "*",
        "help": "fraction of each task's examples kept, in --tasks' order (none given: all of each)"})
    index_kind: str = field(default="pid", metadata={
        "help": "pid = our user index, release = the authors' index, nid = numeric id, "
                "oid = original reviewerID, none = no user index", "choices": INDEX_KINDS})
    index_run: str = field(default="index", metadata={
        "help": "with --index-kind pid: the train.index run folder under runs/<dataset>/ that the "
                "index comes from (e.g. index-titles, an index of the training titles alone)"})
    max_history: int = field(default=20, metadata={"help": "most recent history titles shown"})
    max_title_words: int = field(default=16, metadata={"help": "titles cut to this many words"})
    num_candidates: int = field(default=20, metadata={"help": "candidates per prompt (≤ 20)"})
    max_prefixes_per_user: int = field(default=0, metadata={
        "help": "next-item training prefixes per user, most recent first (0 = all)"})
    train_candidates: str = field(default="random", metadata={
        "help": "next-item training candidates: random (target + 19 random items), retriever "
                "(the retriever's top-20 for the last training item, in retriever order, where "
                "it holds the target: the hard lists test prompts have; other prefixes random) "
                "or retriever-only (only those hard prompts: every next-item example looks like "
                "a test prompt, as LlamaRec trains; on games 8,629 of 15,264 users), or "
                "validation (only the retriever's held-out lists: the validation item after the "
                "whole training sequence, where the top-20 holds it; the retriever never trained "
                "on those targets, so the lists are as hard as the test's; the validation sample "
                "that picks the best step is left out)",
        "choices": ("random", "retriever", "retriever-only", "validation")})
    shuffle_hard: bool = field(default=False, metadata={
        "help": "show the retriever's hard training lists in a random order (the random lists "
                "always are): a letter then says nothing about the retriever's rank, so the LLM "
                "learns from the titles, not the list's positions; test lists keep their order"})
    no_history: bool = field(default=False, metadata={
        "help": "ULMRec-uid: next-item prompts show the index and candidates only"})
    item_tokens: bool = field(default=False, metadata={
        "help": "follow each item title with one soft token: the retriever's item embedding "
                "through a learned projection (ulmrec.item_tokens; LLaRA-style hybrid prompt)"})
    index_prefix_examples: float = field(default=0.0, metadata={
        "help": "extra index_to_pref examples per user on a shorter prefix of the index (<a>, "
                "<a><b>, …) answered with the user's preference, so that a prefix decodes to what "
                "its users share (the app's ladder): 1 = one per user at a random level, 3 = one "
                "per level, 0.5 = for half the users"})
    pref_max_words: int = field(default=0, metadata={
        "help": "index_to_pref responses keep whole sentences within this many words (0 = the "
                "whole text): a target the decoder can finish within its token budget"})
    seed: int = 42


@dataclass
class Example:
    task: str
    user: int
    instruction: str
    input: str
    response: str
    candidates: list[int] | None = None  # item ids in letter order (letter tasks)
    target: int | None = None            # the item the response names (letter tasks)
    prior: list[float] | None = None     # the retriever's scores of `candidates` (hard lists)


@dataclass
class TaskInputs:
    """Everything the prompts may show, all from the training part of each sequence."""
    titles: dict[int, str]
    train: pd.Series                     # user → chronological training items
    ratings: pd.Series | None            # user → ratings aligned with `train` (None: no ratings)
    index: pd.Series | None              # user → index string (None: index kind 'none')
    preference: pd.Series | None         # user → preference text
    num_items: int
    # user → every item of the full sequence: never drawn as a random negative, so a held-out
    # item is not shown to the model as a wrong answer (it is never shown as a right one either)
    seen: pd.Series | None = None
    # user → the retriever's top-20 for the last training item (train_candidates=retriever)
    retrieved: pd.Series | None = None
    retrieved_scores: pd.Series | None = None   # user → the retriever's scores of that list
    # train_candidates=validation: user → the validation item those lists were retrieved for,
    # and the users whose lists stay out of training (the validation sample)
    retrieved_target: pd.Series | None = None
    holdout: frozenset = frozenset()


def user_index_strings(ds, kind: str, pid_table: pd.DataFrame | None = None) -> pd.Series | None:
    """user → the text that stands for the user in prompts, by index kind (Figure 9)."""
    users = ds.users.set_index("user")
    if kind == "none":
        return None
    if kind == "nid":
        return pd.Series(users.index.astype(str), index=users.index)
    if kind == "oid":
        return users["reviewerID"]
    if kind == "release":
        if "release_index" not in users:
            raise ValueError(f"{ds.name}: no authors' index (only the release split has one)")
        return users["release_index"].str.replace(" ", "", regex=False)
    if kind == "pid":
        if pid_table is None:
            raise ValueError("index kind 'pid' needs the user-index table (run train.index)")
        return pid_table.set_index("user")["tokens"]
    raise ValueError(f"unknown index kind '{kind}' ({', '.join(INDEX_KINDS)})")


def prompt_titles(titles: dict[int, str], max_title_words: int, item_tokens: bool = False
                  ) -> dict[int, str]:
    """Each item as the prompts name it: its title cut to `max_title_words`, followed by its
    soft item token when the model has them (the same text in training and serving)."""
    return {int(i): shorten(t, max_title_words) + (f" {item_token(i)}" if item_tokens else "")
            for i, t in titles.items()}


def task_inputs(ds, index: pd.Series | None, preference: pd.Series | None,
                max_title_words: int = 16, item_tokens: bool = False) -> TaskInputs:
    titles = prompt_titles(dict(zip(ds.items["item"], ds.items["title"])), max_title_words,
                           item_tokens)
    tr = ds.interactions[ds.interactions["split"] == "train"].sort_values(["user", "position"])
    train = tr.groupby("user")["item"].agg(list)
    ratings = None
    if tr["rating"].notna().all() and len(tr):
        ratings = tr.groupby("user")["rating"].agg(list)
    seen = ds.sequences("test").map(set)
    return TaskInputs(titles, train, ratings, index, preference, ds.num_items, seen)


def _sample_candidates(rng: random.Random, target: int, exclude: set[int], num_items: int,
                       n: int) -> list[int]:
    pool_size = num_items - len(exclude | {target})
    if pool_size < n - 1:
        raise ValueError(f"only {pool_size} items outside the history; cannot draw {n - 1} negatives")
    negatives: set[int] = set()
    while len(negatives) < n - 1:
        item = rng.randint(1, num_items)
        if item != target and item not in exclude:
            negatives.add(item)
    cands = [target, *sorted(negatives)]
    rng.shuffle(cands)
    return cands


def _seen(inp: TaskInputs, user: int, history: list[int]) -> set[int]:
    return set(history) | (inp.seen[user] if inp.seen is not None else set())


def _retrieved(inp: TaskInputs, user: int, target: int, n: int,
               rng: random.Random | None = None) -> tuple[list[int], list[float] | None] | None:
    """The retriever's top-n for the user's last training item and their scores (None where
    the export has none), if it holds the target.

    The user's other items (later ones above all: the validation and test items) never stand
    as wrong answers; lists exported before the retriever masked them lose those items and
    are topped up with random unseen items (newer exports rank them out already), scored as
    the list's lowest: they were outside the retriever's top-n."""
    if inp.retrieved is None or user not in inp.retrieved.index:
        return None
    own = inp.seen[user] if inp.seen is not None else set()
    scores = None
    if inp.retrieved_scores is not None and user in inp.retrieved_scores.index:
        scores = [float(x) for x in inp.retrieved_scores[user]]
    kept = [(int(i), k) for k, i in enumerate(inp.retrieved[user])
            if int(i) == target or int(i) not in own][:n]
    cands = [i for i, _ in kept]
    if target not in cands:
        return None
    prior = [scores[k] for _, k in kept] if scores is not None else None
    if len(cands) < n:
        rng = rng or random.Random(user)
        extra = _sample_candidates(rng, target, own | set(cands), inp.num_items, n - len(cands) + 1)
        extra = [i for i in extra if i != target]
        cands += extra
        if prior is not None:
            prior += [min(prior)] * len(extra)
    return cands, prior


def _index_line(inp: TaskInputs, user: int) -> str | None:
    if inp.index is None:
        return None
    return f"User index: {inp.index[user]}"


_INDEX_TOKEN = re.compile(r"<[a-z]_\d+>")


def _index_prefixes(index: str, per_user: float, rng: random.Random) -> list[str]:
    """Shorter prefixes of a semantic index for index_to_pref (none for N-ID / O-ID):
    int(per_user) of them, one more with probability of the fraction; levels drawn without
    repeats, all levels when as many are asked."""
    if per_user <= 0:
        return []
    tokens = _INDEX_TOKEN.findall(str(index))
    if len(tokens) < 2:
        return []
    n = int(per_user) + (rng.random() < per_user - int(per_user))
    levels = list(range(1, len(tokens)))
    chosen = levels if n >= len(levels) else sorted(rng.sample(levels, n))
    return ["".join(tokens[:k]) for k in chosen]


def _pref_response(pref: str, max_words: int) -> str:
    """The preference as an index_to_pref target: whole sentences within max_words (the first
    sentence where even that is longer; the whole text when max_words is 0)."""
    pref = " ".join(str(pref).split())
    if not max_words or len(pref.split()) <= max_words:
        return pref
    ends = sentence_ends(pref)
    fits = [e for e in ends if len(pref[:e].split()) <= max_words]
    if fits:
        return pref[: fits[-1]]
    return pref[: ends[0]] if ends else pref


def _pick(rng: random.Random | None, task: str) -> str:
    return INSTRUCTIONS[task][0] if rng is None else rng.choice(INSTRUCTIONS[task])


def next_item_example(inp: TaskInputs, user: int, history: list[int], candidates: list[int],
                      target: int | None, cfg: TaskConfig, rng: random.Random | None = None,
                      prior: list[float] | None = None) -> Example:
    """A next-item prompt; `target=None` builds an inference prompt with no answer."""
    lines = [_index_line(inp, user)]
    if not cfg.no_history:
        lines.append(history_line([inp.titles[i] for i in history[-cfg.max_history:]]))
    lines.append(candidates_block([inp.titles[i] for i in candidates]))
    response = LETTERS[candidates.index(target)] if target is not None else ""
    return Example("next_item", user, _pick(rng, "next_item"),
                   "\n".join(line for line in lines if line), response, list(candidates), target,
                   None if prior is None else list(prior))


@dataclass
class _User:
    """One user as every task builder sees them (training part of the sequence only)."""
    user: int
    seq: list[int]
    pref: str | None          # the preference text, None where there is none
    index: str | None         # the index string, None for index kind 'none'


def _shuffled(cands: list[int], prior: list[float] | None, rng: random.Random
              ) -> tuple[list[int], list[float] | None]:
    """A hard list in a random order, each item keeping its retriever score."""
    order = list(range(len(cands)))
    rng.shuffle(order)
    return [cands[k] for k in order], None if prior is None else [prior[k] for k in order]


def _next_item(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    """Every training prefix → its next item (the last prefix: the retriever's hard list where
    it holds the target, with train_candidates retriever / retriever-only); with
    train_candidates validation, the whole training sequence → the validation item, on the
    retriever's held-out list."""
    if cfg.train_candidates == "validation":
        target = inp.retrieved_target.get(u.user) if inp.retrieved_target is not None else None
        hard = (None if target is None or u.user in inp.holdout
                else _retrieved(inp, u.user, int(target), cfg.num_candidates, rng))
        if hard is None:
            return []
        cands, prior = _shuffled(*hard, rng) if cfg.shuffle_hard else hard
        return [next_item_example(inp, u.user, u.seq, cands, int(target), cfg, rng, prior)]
    only_hard = cfg.train_candidates == "retriever-only"     # the last prefix, hard lists only
    prefixes = 1 if only_hard else cfg.max_prefixes_per_user
    ends = range(len(u.seq) - 1, 0, -1)
    if prefixes:
        ends = list(ends)[:prefixes]
    out = []
    for end in ends:
        target, history = u.seq[end], u.seq[:end]
        hard = (_retrieved(inp, u.user, target, cfg.num_candidates, rng)
                if end == len(u.seq) - 1 else None)
        if only_hard and hard is None:
            continue
        prior = None
        if hard is not None:
            cands, prior = _shuffled(*hard, rng) if cfg.shuffle_hard else hard
        else:
            cands = _sample_candidates(rng, target, _seen(inp, u.user, history), inp.num_items,
                                       cfg.num_candidates)
        out.append(next_item_example(inp, u.user, history, cands, target, cfg, rng, prior))
    return out


def _index_to_pref(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    if u.index is None or u.pref is None:
        return []
    short = _pref_response(u.pref, cfg.pref_max_words)
    out = [Example("index_to_pref", u.user, _pick(rng, "index_to_pref"), f"User index: {u.index}", short)]
    for prefix in _index_prefixes(u.index, cfg.index_prefix_examples, rng):
        out.append(Example("index_to_pref", u.user, _pick(rng, "index_to_pref"),
                           f"User index: {prefix}", short))
    return out


def _pref_to_index(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    if u.index is None or u.pref is None:
        return []
    return [Example("pref_to_index", u.user, _pick(rng, "pref_to_index"), f"Preferences: {u.pref}", u.index)]


def _history_to_index(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    if u.index is None:
        return []
    hist = u.seq[-cfg.max_history:]
    return [Example("history_to_index", u.user, _pick(rng, "history_to_index"),
                    history_line([inp.titles[i] for i in hist]), u.index)]


def _rating(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    if inp.ratings is None or len(u.seq) < 2:
        return []
    hist = u.seq[-cfg.max_history:]
    rates = inp.ratings[u.user][-len(hist):]
    shown = [f"{inp.titles[i]} (rating: {r:g})" for i, r in zip(hist[:-1], rates[:-1])]
    shown.append(f"{inp.titles[hist[-1]]} (rating: ?)")
    lines = [_index_line(inp, u.user), f"Preferences: {u.pref}" if u.pref is not None else None,
             "User history: " + "; ".join(shown)]
    return [Example("rating", u.user, _pick(rng, "rating"), "\n".join(x for x in lines if x),
                    f"{rates[-1]:g}")]


def _intent(inp: TaskInputs, u: _User, cfg: TaskConfig, rng: random.Random) -> list[Example]:
    if u.pref is None:
        return []
    target = u.seq[-1]
    cands = _sample_candidates(rng, target, _seen(inp, u.user, u.seq[:-1]), inp.num_items,
                               cfg.num_candidates)
    text = f"Preferences: {u.pref}\n" + candidates_block([inp.titles[i] for i in cands])
    return [Example("intent", u.user, _pick(rng, "intent"), text, LETTERS[cands.index(target)],
                    cands, target)]


# One builder per task: (inputs, user, config, rng) → that user's examples. Within a user they
# run in this order, whatever --tasks says, so a run's examples depend on its seed alone.
# A new task: its instructions in prompts.INSTRUCTIONS, its builder here.
TASK_BUILDERS = {"next_item": _next_item, "index_to_pref": _index_to_pref,
                 "pref_to_index": _pref_to_index, "history_to_index": _history_to_index,
                 "rating": _rating, "intent": _intent}


def task_ratios(cfg: TaskConfig) -> dict[str, float]:
    """task → the fraction of its examples kept: --task-ratio in --tasks' order, or 1.0 each."""
    if not cfg.task_ratio:
        return {t: 1.0 for t in cfg.tasks}
    if len(cfg.task_ratio) != len(cfg.tasks):
        raise ValueError(f"task_ratio has {len(cfg.task_ratio)} entries for {len(cfg.tasks)} tasks")
    return dict(zip(cfg.tasks, cfg.task_ratio))


def training_examples(inp: TaskInputs, cfg: TaskConfig) -> list[Example]:
    """All training examples of the configured tasks, sampled by ratio and shuffled."""
    rng = random.Random(cfg.seed)
    ratios = task_ratios(cfg)
    unknown = set(cfg.tasks) - set(TASK_BUILDERS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: {tuple(TASK_BUILDERS)}")
    pools: dict[str, list[Example]] = {t: [] for t in cfg.tasks}
    for user, seq in inp.train.items():
        user = int(user)
        pref = inp.preference.get(user) if inp.preference is not None else None
        has_pref = isinstance(pref, str) and pref.strip() != ""
        u = _User(user, seq, pref if has_pref else None,
                  inp.index[user] if inp.index is not None else None)
        for task, build in TASK_BUILDERS.items():
            if task in pools:
                pools[task].extend(build(inp, u, cfg, rng))
    out: list[Example] = []
    for task, ratio in ratios.items():
        pool = pools[task]
        # a ratio above 1 repeats the pool (2.5 = every example twice, half of them thrice)
        copies, frac = (int(ratio), ratio - int(ratio)) if ratio > 1 else (0, ratio)
        out.extend(pool * copies)
        keep = len(pool) if frac >= 1 else int(round(len(pool) * frac))
        out.extend(rng.sample(pool, keep) if keep < len(pool) else pool)
    rng.shuffle(out)
    return out


def task_counts(examples: list[Example]) -> dict[str, int]:
    return {k: int(v) for k, v in pd.Series([e.task for e in examples]).value_counts().sort_index().items()}


def eval_examples(ds, inp: TaskInputs, candidates: pd.DataFrame, split: str, cfg: TaskConfig,
                  users: list[int] | None = None) -> tuple[list[Example], pd.DataFrame]:
    """Next-item prompts for users whose `split` target is among their retrieved candidates.

    Returns (examples, frame of every user of the split with target_in_candidates); users
    outside the candidates score 0 in the Overall view without an LLM call.
    """
    frame = candidates[candidates["split"] == split].set_index("user").sort_index()
    if users is not None:
        frame = frame.loc[[u for u in users if u in frame.index]]
    history = ds.sequences("train" if split == "val" else "val")
    out = []
    for user, row in frame.iterrows():
        cands = [int(i) for i in row["candidates"]][: cfg.num_candidates]
        target = int(row["target"])
        if target not in cands:
            continue
        scores = [float(x) for x in row["scores"]][: cfg.num_candidates] if "scores" in row else None
        out.append(next_item_example(inp, int(user), history[user], cands, target, cfg,
                                     prior=scores if scores and len(scores) == len(cands) else None))
    frame = frame.assign(target_in_candidates=[
        int(t) in [int(c) for c in cs][: cfg.num_candidates]
        for t, cs in zip(frame["target"], frame["candidates"])])
    return out, frame.reset_index()


def random_candidates(ds, split: str, n: int = 20, seed: int = 0) -> pd.DataFrame:
    """A retriever-free candidate frame (target + random negatives), for tests and ablations."""
    rng = np.random.default_rng(seed)
    hist = ds.sequences("train" if split == "val" else "val")
    rows = []
    for user, target in ds.targets(split).items():
        seen = set(hist[user])
        pool = np.setdiff1d(np.arange(1, ds.num_items + 1), list(seen | {int(target)}))
        cands = [int(target), *rng.choice(pool, size=n - 1, replace=False).tolist()]
        rng.shuffle(cands)
        rows.append({"user": int(user), "split": split, "target": int(target), "candidates": cands,
                     "scores": [0.0] * n, "target_in_candidates": True})
    return pd.DataFrame(rows)
