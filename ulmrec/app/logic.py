"""What the app shows, as plain functions of a loaded bundle (no Gradio here: tests call them).

Errors a visitor can cause (unknown user, malformed index prefix) raise `AppError` with a
message meant for the page; the UI layer turns it into a Gradio warning.
"""
from __future__ import annotations

import html
import random
import re
import threading
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..bundle_format import MOVES
from ..indexing.table import level_letter, parse_token_string, token_string
from ..live import shared_counts
from ..profile import ProfileIndex

# the index vocabulary every bundle's tokenizer carries (ulmrec.indexing.table.index_vocab)
MAX_LEVELS, CODEBOOK_SIZE = 4, 256
LADDER_TOKENS = 48     # new tokens per rung at most; decoding stops after two sentences
NEIGHBOURS = 5
RETRIEVED = ("any", "yes", "no")
SEARCH_HITS = 50       # users a search shows at most


ECHO = 40              # characters of a visitor's input quoted back in a message


class AppError(ValueError):
    """A visitor's input the app cannot serve; the message is shown on the page."""


def echo(value, n: int = ECHO) -> str:
    """A visitor's input quoted for a message: repr'd, and cut to `n` characters with its
    length said when longer (a 10,000-character paste is not echoed whole)."""
    text = str(value)
    if len(text) <= n:
        return repr(text)
    return f"{text[:n]!r}… ({len(text):,} characters)"


@dataclass
class AppData:
    """A bundle plus the per-user facts the pickers and charts need, computed once."""
    bundle: object
    users: pd.DataFrame                 # indexed by dense id: reviewerID, history_len, retrieved, …
    titles: dict[int, str]
    test_candidates: dict[int, list[int]]
    levels: list[str]                   # code columns present ('a'..'d'), empty for O-ID/N-ID
    codes: np.ndarray                   # [users, levels] aligned with `users`
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    bf16: bool = False                  # CPU only, opt-in: ~40% faster, scores move slightly
    int8: bool = False                  # CPU only, opt-in: int8 weights (ulmrec.ranker.quantize_int8)
    rank_batcher: object = field(default=None, repr=False)   # ranking.RankBatcher, made on first use


def prepare(bundle, bf16: bool = False, int8: bool = False) -> AppData:
    users = bundle.users.set_index("user", drop=False).sort_index()
    test = bundle.candidates[bundle.candidates["split"] == "test"]
    cands = {int(u): [int(i) for i in c] for u, c in zip(test["user"], test["candidates"])}
    levels = [c for c in "abcd" if c in users and users[c].notna().all()]
    codes = users[levels].to_numpy(dtype=np.int64) if levels else np.zeros((len(users), 0), np.int64)
    table = pd.DataFrame({
        "reviewerID": users["reviewerID"].astype(str),
        "history_len": users["history"].map(len).astype(int),
        "has_candidates": [int(u) in cands for u in users.index],
        "retrieved": [int(t) in cands.get(int(u), ()) for u, t in zip(users.index, users["target"])],
    }, index=users.index)
    if bf16 and int8:
        raise ValueError("choose one of bf16 and int8")
    return AppData(bundle, table, bundle.titles(), cands, levels, codes, bf16=bf16, int8=int8)


def warm(data: AppData):
    """Load and prepare the model once; every handler calls this first, so concurrent
    requests cannot race to load it twice (also with --no-preload).

    On CPU the LoRA update is merged into the base weights (same scores to ~1e-5, ~10%
    faster per call) and, if asked, cast to bfloat16 or int8; a CUDA model is left as loaded.
    """
    with data.lock:
        return data.bundle.served_model(bf16=data.bf16, int8=data.int8)


def warm_decoder(data: AppData):
    """The decode panel's model, ready: the bundle's decode/ adapter when it has one (its own
    copy of the backbone), else the ranker (warm)."""
    if not data.bundle.has_decoder:
        return warm(data)
    with data.lock:
        return data.bundle.served_decoder(bf16=data.bf16)


# ------------------------------------------------------------------ picking a user

def user_label(data: AppData, user: int) -> str:
    return f"{data.users.at[user, 'reviewerID']} · #{user}"


def filtered_users(data: AppData, min_len: float | None = None, max_len: float | None = None,
                   retrieved: str = "any") -> pd.Index:
    """Dense ids of the users with test candidates passing the filters."""
    t = data.users[data.users["has_candidates"]]
    if min_len is not None:
        t = t[t["history_len"] >= min_len]
    if max_len is not None:
        t = t[t["history_len"] <= max_len]
    if retrieved in MOVES:                 # where the LLM put the real item (evaluated users)
        out = data.bundle.outcomes
        if out is None:
            raise AppError("this bundle records no evaluated outcomes: filter by 'any', 'yes' or 'no'")
        return t.index[t.index.isin(out.index[out["moved"] == retrieved])]
    if retrieved not in RETRIEVED:
        raise AppError(f"target retrieved: {retrieved!r}, expected one of "
                       f"{', '.join(RETRIEVED + MOVES)}")
    if retrieved != "any":
        t = t[t["retrieved"] == (retrieved == "yes")]
    return t.index


MOVE_LABELS = {"up": "the LLM moved it up", "same": "the LLM left it in place",
               "down": "the LLM moved it down"}


def retrieved_choices(data: AppData) -> list[tuple[str, str]]:
    """The 'next item' filter's choices: among the candidates or not, and, where the bundle
    records its evaluation, where the LLM put it against the retriever's order."""
    choices = [(v, v) for v in RETRIEVED]
    if data.bundle.outcomes is not None:
        choices += [(MOVE_LABELS[m], m) for m in MOVES]
    return choices


def outcome_counts(data: AppData) -> str:
    """One line on how often the served model helps and hurts, beside the one user shown."""
    out = data.bundle.outcomes
    if out is None:
        return ""
    n = out["moved"].value_counts()
    return (f"Over the {len(out):,} evaluated test users whose real next item was among the 20 "
            f"candidates, the LLM moved it **up** for {n.get('up', 0):,}, left it **in place** for "
            f"{n.get('same', 0):,} and moved it **down** for {n.get('down', 0):,} against the "
            "retriever's order (browse each group: Filters → next item).")


def user_labels(data: AppData, ids) -> list[str]:
    """user_label for many ids in one lookup (filters and searches label thousands)."""
    rid = data.users.loc[list(ids), "reviewerID"].astype(str)
    return [f"{r} · #{int(u)}" for u, r in zip(rid.index, rid)]


def user_choices(data: AppData, min_len: float | None = None, max_len: float | None = None,
                 retrieved: str = "any") -> list[tuple[str, int]]:
    """(label, dense id) for users with test candidates passing the filters."""
    ids = filtered_users(data, min_len, max_len, retrieved)
    return list(zip(user_labels(data, ids), (int(u) for u in ids)))


def search_users(data: AppData, query: str, min_len: float | None = None,
                 max_len: float | None = None, retrieved: str = "any",
                 n: int = SEARCH_HITS) -> tuple[int, list[int]]:
    """(how many match, the first `n` of them) among the filtered users whose reviewerID holds
    `query`, case-insensitive; those it starts with first. The page ships no user list: the
    games demo has 15,264 users, and a list of them made every click on the page slow."""
    ids = filtered_users(data, min_len, max_len, retrieved)
    rid = data.users.loc[ids, "reviewerID"].astype(str).str.casefold()
    q = (query or "").strip().casefold()
    hit = rid[rid.str.contains(q, regex=False)]
    first = hit.str.startswith(q)
    order = list(hit.index[first.to_numpy()]) + list(hit.index[~first.to_numpy()])
    return len(hit), [int(u) for u in order[:n]]


START_RULE = ("the user with the longest history whose next item is among the retriever's "
              "20 candidates (ties: the lowest id)")


def start_user(data: AppData) -> int | None:
    """The user the page opens on (START_RULE): one whose ranking can be right or wrong, with
    the most history to look at. None when no user has test candidates."""
    t = data.users[data.users["has_candidates"]]
    if t.empty:
        return None
    hit = t[t["retrieved"]] if t["retrieved"].any() else t
    longest = hit["history_len"].max()
    return int(hit.index[hit["history_len"] == longest].min())


USER_HINT = "type a reviewerID, '#id' or the dense id, then Enter"
NO_MATCH = "no user matches these filters: widen the history range or set 'target retrieved' to any"


def random_user(choices: list[tuple[str, int]], rng: random.Random | None = None,
                current=None) -> int:
    """A user from `choices`, never the one shown now (`current`) when there is another."""
    if not choices:
        raise AppError(NO_MATCH)
    others = [c for c in choices if str(c[1]) != str(current) and c[0] != current]
    return (rng or random).choice(others or choices)[1]


def draw_user(data: AppData, min_len: float | None = None, max_len: float | None = None,
              retrieved: str = "any", current=None, rng: random.Random | None = None) -> int:
    """A random user passing the filters, drawn here on the server (random_user's rules)."""
    ids = [int(u) for u in filtered_users(data, min_len, max_len, retrieved)]
    if not ids:
        raise AppError(NO_MATCH)
    others = [u for u in ids if u != current] or ids
    return (rng or random).choice(others)


def resolve_user(data: AppData, value) -> int:
    """A dense id (int or digits, '#17'), a reviewerID, or a dropdown label → dense id."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise AppError(f"no user given: {USER_HINT}")
    if isinstance(value, str) and " · #" in value:          # a label typed or pasted as is
        value = value.rsplit(" · #", 1)[1]
    if isinstance(value, str):
        value = value.strip().lstrip("#")
        if len(value) > ECHO:           # no reviewerID is this long: do not quote it whole
            raise AppError(f"unknown user {echo(value)}")
    try:
        return int(data.bundle.user_row(value)["user"])
    except KeyError as e:
        raise AppError(str(e.args[0]) if e.args else f"unknown user {echo(value)}") from None
    except (TypeError, ValueError):
        raise AppError(f"unknown user {echo(value)}") from None


def user_summary(data: AppData, user: int) -> str:
    row = data.users.loc[user]
    target = int(data.bundle.users.set_index("user").at[user, "target"])
    got = ("among the retriever's 20 candidates" if row["retrieved"] else
           "**not** among the 20 candidates: the LLM cannot rank it (Overall counts 0)")
    return (f"**{row['reviewerID']}** (id {user}) · {row['history_len']} past items · "
            f"next item (held out, what the models should find): "
            f"*{data.titles.get(target, target)}*, {got}")


def history_markdown(data: AppData, user: int, shown: int = 30) -> str:
    """History titles, most recent first; the ones inside the prompt window are marked."""
    hist = list(data.bundle.users.set_index("user").at[user, "history"])
    window = int(data.bundle.ranker_config().max_history)
    lines = []
    for k, item in enumerate(reversed(hist[-shown:])):
        mark = "▸" if k < window else "·"
        lines.append(f"{k + 1}. {mark} {data.titles.get(int(item), item)}")
    more = f"\n\n…and {len(hist) - shown} older items" if len(hist) > shown else ""
    return (f"▸ = in the prompt (the last {window}); most recent first\n\n" + "\n".join(lines) + more)


# ------------------------------------------------------------------ the semantic index

def _need_codes(data: AppData) -> None:
    if not data.levels:
        raise AppError(f"this bundle's index kind is '{data.bundle.manifest.index_kind}': "
                       "it has no semantic codes (only P-ID bundles do)")


def _row_pos(data: AppData, user: int) -> int:
    return int(data.users.index.get_loc(user))


def shared_prefix(codes: np.ndarray, mine: np.ndarray) -> np.ndarray:
    """Per row of `codes`: how many leading levels equal `mine`."""
    same = codes == mine[None, :]
    return np.cumprod(same, axis=1).sum(axis=1)


def index_chips(data: AppData, user: int) -> str:
    """The user's codes as coloured chips labelled with their level."""
    if not data.levels:
        index = data.bundle.users.set_index("user").at[user, "index"]
        return (f"<div class='ulm-note'>index kind '{html.escape(str(data.bundle.manifest.index_kind))}': "
                f"<code>{html.escape(str(index))}</code> (no semantic codes)</div>")
    return chips_html(data.codes[_row_pos(data, user)])


def chips_html(codes) -> str:
    """Codes [L] as coloured chips labelled with their level (integers only: nothing to escape)."""
    chips = "".join(
        f"<span class='ulm-chip ulm-l{lv}' title='level {level_letter(lv)}'>"
        f"<small>{level_letter(lv)}</small>&lt;{level_letter(lv)}_{int(c)}&gt;</span>"
        for lv, c in enumerate(codes))
    return f"<div class='ulm-chips' data-index='{token_string(codes)}'>{chips}</div>"


def prefix_table(data: AppData, user: int) -> pd.DataFrame:
    """For each level: the prefix up to it and how many users share that prefix."""
    _need_codes(data)
    return shared_counts(data.codes, data.codes[_row_pos(data, user)])


def nearest_users(data: AppData, user: int, k: int = NEIGHBOURS) -> pd.DataFrame:
    """The k users sharing the longest index prefix with `user`, this user first, with the
    preference texts side by side (ties: the most similar history length)."""
    _need_codes(data)
    pos = _row_pos(data, user)
    shared = shared_prefix(data.codes, data.codes[pos])
    gap = np.abs(data.users["history_len"].to_numpy() - data.users["history_len"].iloc[pos])
    order = np.lexsort((data.users.index.to_numpy(), gap, -shared))
    order = [pos] + [i for i in order if i != pos][:k]
    prefs = data.bundle.users.set_index("user")["preference"]
    ids = data.users.index.to_numpy()[order]
    return pd.DataFrame({
        "user": [user_label(data, int(u)) + (" (this user)" if int(u) == user else "") for u in ids],
        "index": [token_string(data.codes[i]) for i in order],
        "shared levels": [int(shared[i]) for i in order],
        "extracted preference": [prefs.get(int(u)) or "—" for u in ids],
    })


# ------------------------------------------------------------------ decoding an index

LEVEL_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def _too_deep(levels: int, n: int) -> str:
    return (f"this index has {levels} levels (<a_…> to <{level_letter(levels - 1)}_…>); "
            f"this prefix has {n}")


def _level_order_problem(text: str, levels: int = MAX_LEVELS) -> str | None:
    """What is wrong with the order of the level tokens in `text` ('<a_1><c_2>': level b is
    missing), or None when they run a, b, c, … from the start. Past the index's last level
    the message says how many levels it has: asking for a level e it lacks misleads."""
    tokens = [(m.group(1), m.group(0)) for m in LEVEL_TOKEN.finditer(text)]
    for k, (got, token) in enumerate(tokens):
        if k >= levels:
            return _too_deep(levels, len(tokens))
        want = level_letter(k)
        if got == want:
            continue
        if k == 0:
            return f"it starts at level {got} ({token}); a prefix starts at level a (<a_…>)"
        if got > want:
            return (f"level {want} is missing: {tokens[k - 1][1]} is followed by {token}; "
                    "levels run a, b, c, d without gaps")
        return (f"{token} comes after {tokens[k - 1][1]}: each level appears once, "
                f"in the order a, b, c, d (expected <{want}_…> next)")
    return None


def check_prefix(text: str, levels: int = MAX_LEVELS) -> str:
    """A well-formed prefix of a `levels`-level index, in canonical form ('<a_1> <b_2>' →
    '<a_1><b_2>')."""
    text = (text or "").strip()
    try:
        codes = parse_token_string(text)
    except ValueError:
        why = _level_order_problem(text, levels)
        raise AppError(f"not an index prefix: {echo(text)}: " + (why or (
            "write level tokens in order starting at <a_…>, e.g. <a_12> or <a_12><b_3>"))
        ) from None
    canon = token_string(codes)
    if canon != text.replace(" ", ""):
        raise AppError(f"not an index prefix: {echo(text)} holds text besides the level tokens")
    if len(codes) > levels:
        raise AppError(f"not an index prefix: {echo(text)}: {_too_deep(levels, len(codes))}")
    bad = [c for c in codes if c >= CODEBOOK_SIZE]
    if bad:
        raise AppError(f"{echo(text)}: code {bad[0]} is outside the codebook (0..{CODEBOOK_SIZE - 1})")
    return canon


def decode_prefix(data: AppData, text: str, max_new_tokens: int = LADDER_TOKENS) -> str:
    """The generated preference of any prefix: plain text, whole sentences (ulmrec.decode)."""
    prefix = check_prefix(text, len(data.levels) or MAX_LEVELS)
    if data.bundle.manifest.index_kind not in ("pid", "release"):
        raise AppError("this bundle was trained without index tokens (index kind "
                       f"'{data.bundle.manifest.index_kind}'): nothing to decode")
    warm_decoder(data)
    return data.bundle.decode(prefix, max_new_tokens=max_new_tokens) or "(empty)"


def decode_many(bundle, prefixes: list[str], max_new_tokens: int = LADDER_TOKENS) -> list[str]:
    """The rungs of a ladder, batched (callers ran warm())."""
    return [t or "(empty)" for t in bundle.decode_many(prefixes, max_new_tokens)]


def profiles(data: AppData):
    """The data-only prefix profiles (ulmrec.profile), built once per AppData: every user's
    codes, training items (the history before the validation item) and preference."""
    prof = getattr(data, "_profile_index", None)
    if prof is None:
        users = data.bundle.users.set_index("user").reindex(data.users.index)
        prof = ProfileIndex.build([token_string(c) for c in data.codes],
                                  [list(h)[:-1] for h in users["history"]], data.titles,
                                  users["preference"].tolist())
        data._profile_index = prof
    return prof


def ladder(data: AppData, user: int, max_new_tokens: int = LADDER_TOKENS) -> pd.DataFrame:
    """Paper §5.4.4: decode <a>, <a><b>, … the full index; beside each rung, how many users
    share the prefix and what they have in common in the data (ulmrec.profile)."""
    table = prefix_table(data, user)
    prefixes = [check_prefix(p) for p in table["prefix"]]
    prof = profiles(data)
    warm_decoder(data)
    table["generated preference"] = decode_many(data.bundle, prefixes, max_new_tokens)
    table["what these users share (data)"] = [
        prof.profile(p).text().split(" · ", 1)[-1] for p in prefixes]
    return table


def user_preference(data: AppData, user: int) -> str:
    pref = data.bundle.users.set_index("user").at[user, "preference"]
    return pref if isinstance(pref, str) and pref else "(this bundle has no extracted preference)"
