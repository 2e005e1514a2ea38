"""A history that is not in the table: live candidates, a user index, the ranking and the ladder.

A bundle made by this version carries the retriever (retriever/) and, for a P-ID index, the
indexer (indexer/: eq. 1's attention + the RQ-VAE); with them a new history is served the way
a table user is:

    1. candidates  the retriever's top-20 unseen items (retrieval.evaluate.masked_scores, the
                   function that exported the table users' lists)
    2. index       the indexer's greedy codes for the user's texts (the given text, and each
                   history title as one more "review", as the release split's title proxies);
                   beside it the index the LLM predicts from the history (history → index)
    3. ranking     the ranker's letter probabilities (+ the retriever prior where fitted)
    4. ladder      the decoded preference of each prefix of the index

Nothing is stored: every call starts from the given input alone.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from .indexing.attention import segment_softmax
from .indexing.encoder import embed, load_encoder
from .indexing.fit import IndexConfig
from .indexing.rqvae import RQVAE
from .indexing.table import level_letter, parse_token_string, token_string
from .model import cache_kw, encode
from .prompts import INSTRUCTIONS, history_line
from .retrieval.evaluate import masked_scores
from .retrieval.trainer import load_retriever
from .tasks import Example, TaskInputs, next_item_example

MAX_ITEMS = 20        # the most history items one request may give
MAX_TEXT = 2000       # characters of optional text
NEW_USER = 0          # dense user ids start at 1: 0 stands for the person asking


class InputError(ValueError):
    """What is wrong with a given history or text, in words a person can act on."""


# ------------------------------------------------------------------ the input

def resolve_history(items: pd.DataFrame, history, max_items: int = MAX_ITEMS
                    ) -> tuple[list[int], list[str]]:
    """Item ids (dense ids, asins) or exact titles, most recent last → (dense item ids, notes on
    what was changed). InputError names every unknown entry with the closest titles."""
    if isinstance(history, (str, int)):
        history = [history]
    entries = [str(h).strip() for h in (history or []) if str(h).strip()]
    if not entries:
        raise InputError("the history is empty: give 1 to "
                         f"{max_items} items (ids or exact titles), most recent last")
    ids = set(items["item"].astype(int))
    by_asin = dict(zip(items["asin"].astype(str), items["item"].astype(int)))
    by_title: dict[str, int] = {}
    for item, title in zip(items["item"].astype(int), items["title"].astype(str)):
        by_title.setdefault(title.strip().casefold(), item)     # a repeated title: its first item
    out, unknown = [], []
    for e in entries:
        if e.isdigit() and int(e) in ids:
            out.append(int(e))
        elif e in by_asin:
            out.append(by_asin[e])
        elif e.casefold() in by_title:
            out.append(by_title[e.casefold()])
        else:
            unknown.append(e)
    if unknown:
        titles = items["title"].astype(str).tolist()
        hints = []
        for e in unknown[:5]:
            close = difflib.get_close_matches(e, titles, n=3, cutoff=0.5)
            hints.append(f"{e[:80]!r}" + (f" (did you mean {' / '.join(repr(c) for c in close)}?)"
                                          if close else ""))
        raise InputError(f"{len(unknown)} of the {len(entries)} history entries are not in the "
                         f"catalogue: {'; '.join(hints)}" + (" …" if len(unknown) > 5 else ""))
    notes = []
    dedup = list(dict.fromkeys(reversed(out)))[::-1]      # keep each item's most recent place
    if len(dedup) < len(out):
        notes.append(f"{len(out) - len(dedup)} repeated item(s) kept once, at their latest place")
    if len(dedup) > max_items:
        notes.append(f"{len(dedup)} items given: the {max_items} most recent are used")
        dedup = dedup[-max_items:]
    return dedup, notes


def check_text(text: str | None, max_chars: int = MAX_TEXT) -> str | None:
    """The optional text, stripped; InputError over the cap. Markup stays text: callers escape."""
    text = (text or "").strip()
    if len(text) > max_chars:
        raise InputError(f"the text is {len(text):,} characters; the limit is {max_chars:,}")
    return text or None


# ------------------------------------------------------------------ 1. the retriever

@dataclass
class LiveRetriever:
    """The bundle's retriever over the dataset's dense item ids (mapped by asin)."""
    model: torch.nn.Module
    max_len: int
    to_model: dict[int, int]      # dataset item id → the retriever's item id
    to_item: dict[int, int]       # and back

    @classmethod
    def load(cls, folder: Path, asin_to_item: dict[str, int]) -> "LiveRetriever":
        model, spec = load_retriever(folder)
        asins = json.loads((folder / "items.json").read_text())      # position = retriever id
        to_model = {asin_to_item[a]: i for i, a in enumerate(asins) if i and a in asin_to_item}
        return cls(model, int(spec["kwargs"]["max_len"]), to_model,
                   {m: i for i, m in to_model.items()})

    def top(self, history: list[int], k: int = 20) -> tuple[list[int], list[float]]:
        """The k best unseen items after `history` and their scores, best first."""
        hist = [self.to_model[i] for i in history if i in self.to_model]
        if not hist:
            raise InputError("none of the history's items is known to the retriever")
        scores = masked_scores(self.model, [hist], self.max_len, "cpu")[0]
        s, top = torch.topk(scores, k)
        return [self.to_item[int(i)] for i in top], [float(x) for x in s]


# ------------------------------------------------------------------ 2. the indexer

@dataclass
class Indexer:
    """Eq. 1 over the user's texts, keyed by the table users' mean ID embedding (a new user has
    no original ID), then the RQ-VAE's greedy codes (no collision step: a new user is not in
    the table, so a shared full index is reported, not moved)."""
    rqvae: RQVAE
    A: torch.Tensor               # [D, D]
    query: torch.Tensor           # [D] e_o of a new user
    spec: dict
    _encoder: object = field(default=None, repr=False)

    @classmethod
    def load(cls, folder: Path) -> "Indexer":
        spec = json.loads((folder / "indexer.json").read_text())
        tensors = load_file(folder / "indexer.safetensors")
        cfg = IndexConfig(**{k: tuple(v) if k == "hidden" else v for k, v in spec["config"].items()
                             if k in IndexConfig.__dataclass_fields__})
        model = RQVAE(cfg.rqvae(int(tensors["new_user_query"].shape[0])))
        model.load_state_dict({k.removeprefix("rqvae."): v for k, v in tensors.items()
                               if k.startswith("rqvae.")})
        return cls(model.eval(), tensors["attention.A"], tensors["new_user_query"], spec)

    def encoder(self):
        if self._encoder is None:
            enc = load_encoder(self.spec["config"].get("encoder") or None,
                               self.spec["config"].get("max_length", 256))
            want = self.spec.get("encoder_fingerprint")
            if want and enc.fingerprint != want:
                raise InputError(f"the sentence encoder here ({enc.fingerprint}) is not the one the "
                                 f"index was trained with ({want}): codes would not mean the same")
            self._encoder = enc
        return self._encoder

    @torch.no_grad()
    def codes(self, texts: list[str], query: torch.Tensor | None = None) -> list[int]:
        """Codes [L] for one user's texts; `query` an original ID's embedding (default: a new
        user's)."""
        emb = torch.from_numpy(embed(self.encoder(), texts, desc="index"))           # [R, D]
        q = self.A @ (self.query if query is None else query)                        # [D]
        alpha = segment_softmax(emb @ q, torch.zeros(len(emb), dtype=torch.long), 1)
        x = (alpha[:, None] * emb).sum(0, keepdim=True)                              # [1, D]
        return [int(c) for c in self.rqvae.codes(x)[0][0]]


def shared_counts(table_codes: np.ndarray, mine: list[int]) -> pd.DataFrame:
    """level, prefix, users sharing it (of the table), for each prefix of `mine`."""
    same = np.cumprod(table_codes == np.asarray(mine)[None, :], axis=1)              # [U, L]
    return pd.DataFrame({"level": [level_letter(lv) for lv in range(len(mine))],
                         "prefix": [token_string(mine[: lv + 1]) for lv in range(len(mine))],
                         "users sharing it": same.sum(0).astype(int).tolist()})


@torch.no_grad()
def predict_index(model, tok, fmt: str, titles: list[str], levels: int, size: int,
                  max_len: int = 512) -> list[int]:
    """The index the LLM writes for a history (task history → index), one level at a time,
    each step choosing among that level's codebook tokens only."""
    ex = Example("history_to_index", NEW_USER, INSTRUCTIONS["history_to_index"][0], history_line(titles), "")
    ids = encode(tok, ex, fmt, max_len, with_response=False)["input_ids"]
    device = next(model.parameters()).device
    # the prompt runs once; each level after it feeds one token on top of the KV cache
    cache, step, codes = DynamicCache(config=model.config), torch.tensor([ids], device=device), []
    for lv in range(levels):
        vocab = tok.convert_tokens_to_ids([f"<{level_letter(lv)}_{c}>" for c in range(size)])
        logits = model(input_ids=step, use_cache=True, logits_to_keep=1,
                       **{cache_kw(model): cache}).logits[0, -1]                     # [V]
        c = int(torch.argmax(logits[torch.tensor(vocab, device=device)]))
        codes.append(c)
        step = torch.tensor([[vocab[c]]], device=device)
    return codes


# ------------------------------------------------------------------ the answer

@dataclass
class Recommendation:
    history: list[int]                 # the items used, most recent last
    notes: list[str]                   # what was changed or could not be done
    candidates: pd.DataFrame           # letter, item, title, prob, llm_rank, retriever_rank, …
    index: str | None = None           # the indexer's codes (P-ID bundles)
    index_source: str = ""
    shared: pd.DataFrame | None = None     # level, prefix, users sharing it
    collisions: list[str] = field(default_factory=list)   # table users with the same full index
    predicted_index: str | None = None     # the LLM's history → index
    agreement: float | None = None         # share of levels where both indices agree
    ladder: pd.DataFrame | None = None     # level, prefix, generated preference

    def to_dict(self) -> dict:
        """JSON-ready: what the /recommend endpoint returns."""
        def rows(frame):
            return None if frame is None else json.loads(frame.to_json(orient="records"))
        out = asdict(self)
        out.update(candidates=rows(self.candidates), shared=rows(self.shared),
                   ladder=rows(self.ladder))
        return out


def build_example(bundle, history: list[int], candidates: list[int], index: str | None):
    """The next-item prompt for a new user, by the same builder as for table users."""
    cfg = bundle.ranker_config()
    table = bundle.task_inputs(cfg)
    inp = TaskInputs(table.titles, pd.Series({NEW_USER: history}), None,
                     pd.Series({NEW_USER: index or ""}) if table.index is not None and index else None,
                     None, table.num_items)
    return next_item_example(inp, NEW_USER, history, candidates, None, cfg), cfg


def recommend(bundle, history, text: str | None = None, ladder: bool = True,
              predict: bool = True) -> Recommendation:
    """Serve a new history (see the module docstring). InputError on bad input."""
    items, notes = resolve_history(bundle.items, history)
    text = check_text(text)
    retriever = bundle.live_retriever()
    if len(items) > retriever.max_len:
        notes.append(f"the retriever reads the last {retriever.max_len} items")
    cands, scores = retriever.top(items, bundle.ranker_config().num_candidates)
    titles = bundle.titles()
    kind = bundle.manifest.index_kind
    rec = Recommendation(items, notes, pd.DataFrame())
    codes_table = bundle.users[[c for c in "abcd" if c in bundle.users]].to_numpy() \
        if kind in ("pid", "release") else None
    if bundle.has_indexer:
        texts = ([text] if text else []) + [titles[i] for i in items]
        codes = bundle.indexer().codes(texts)
        rec.index = token_string(codes)
        rec.index_source = ("your text and the titles of your items" if text
                            else "the titles of your items")
    if predict and bundle.has_decoder and kind in ("pid", "release"):
        model, tok, fmt = bundle.decoder()
        levels = codes_table.shape[1]
        cfg = bundle.ranker_config()
        size = bundle.manifest.live.get("indexer", {}).get("codebook_size", 256)
        pred = predict_index(model, tok, fmt, [titles[i] for i in items[-cfg.max_history:]],
                             levels, size, cfg.max_len)
        rec.predicted_index = token_string(pred)
        if rec.index is None:
            rec.index, rec.index_source = rec.predicted_index, (
                "predicted by the LLM from your items (this bundle carries no indexer)")
            notes.append("no indexer in this bundle: the index shown is the LLM's prediction")
        else:
            rec.agreement = float(np.mean([a == b for a, b in zip(parse_token_string(rec.index), pred)]))
    if rec.index is not None and codes_table is not None:
        mine = parse_token_string(rec.index)
        rec.shared = shared_counts(codes_table, mine)
        full = (codes_table == np.asarray(mine)[None, :]).all(1)
        rec.collisions = bundle.users.loc[full, "reviewerID"].astype(str).tolist()
        if rec.collisions:
            notes.append(f"this full index is also the index of {len(rec.collisions)} table user(s)")
    elif rec.index is None:
        notes.append(f"index kind '{kind}': a new user gets no index; the prompt shows none")

    example, cfg = build_example(bundle, items, cands, rec.index)
    rec.candidates = bundle.rank_examples([example], [scores])[0]
    if ladder and rec.index is not None and bundle.has_decoder and rec.shared is not None:
        table = rec.shared.copy()
        table["generated preference"] = [t or "(empty)" for t in bundle.decode_many(table["prefix"].tolist())]
        rec.ladder = table
    return rec
