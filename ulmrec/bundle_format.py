"""The bundle format: what `train.export` writes, `train.push` uploads and the app loads.

A bundle is one folder (or a Hub model repo with the same files):

    bundle.json                 manifest: format, dataset (name, fingerprint, sizes), backbone
                                reference, index kind, preference source, sha256 of every file
    adapter_config.json         the LoRA adapter (PEFT), index-token rows included
    adapter_model.safetensors
    item_tokens.safetensors     (optional) soft item tokens: retriever item embedding + projection
    line_head.safetensors       (optional) the line scorer's vector (ranker scorer 'lines')
    tokenizer.json, tokenizer_config.json, …   the backbone tokenizer + the 1,024 index tokens,
    or tokenizer_ref.json       or a reference to the backbone's tokenizer + the added tokens
    ulmrec_config.json          the ranker/task configuration the adapter was trained with
    user_index.parquet          reviewerID → index string (+ codes a,b,c,d where it has them)
    candidates.parquet          reviewerID, split, retrieved asins in retriever order, scores
    fusion.json                 (optional) the retriever-prior weight λ fitted on validation users
    outcomes.parquet            (optional, manifest key "outcomes") per evaluated test user whose
                                item was retrieved: retriever_rank, llm_rank, moved up/same/down
    metrics.json                the evaluation payload (Rank/Overall per system)
    config.yaml                 the pipeline configuration that made it
    README.md                   Hub model card
    items.parquet, users.parquet   only when the bundle carries its data (includes_data)
    lcrec/                      optional (manifest key "lcrec"): an LC-Rec adapter + tokenizer,
                                lcrec_config.json, item_index.parquet (asin → item index) and
                                metrics.json: the app's whole-catalogue mode
    decode/                     optional (manifest key "decode"): an adapter trained for
                                index → preference text (its own prompt format in
                                ulmrec_config.json), used by decode(); else the ranker decodes

A bundle without data is joined at load time with the dataset under ULMREC_DATA.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .paths import sha256_file

log = logging.getLogger(__name__)

FORMAT = "ulmrec-bundle/1"
MANIFEST = "bundle.json"
REQUIRED_FILES = (MANIFEST, "adapter_config.json", "adapter_model.safetensors",
                  "ulmrec_config.json", "user_index.parquet",
                  "candidates.parquet", "metrics.json", "config.yaml", "README.md")
# a tokenizer: its own files (older bundles), or a reference to the base backbone's tokenizer
# + the added tokens (ulmrec.backbone.save_tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_REF = "tokenizer_ref.json"
DATA_FILES = ("items.parquet", "users.parquet")
OUTCOMES = "outcomes.parquet"
MOVES = ("up", "same", "down")      # where the model moved the real item against the retriever
LCREC_DIR = "lcrec"
LCREC_FILES = ("adapter_config.json", "adapter_model.safetensors", "lcrec_config.json",
               "item_index.parquet", "metrics.json")
# the LC-Rec part keeps its own tokenizer only when it differs from the ranker's
# (manifest lcrec.tokenizer "own"); the same index vocabulary usually makes them identical
LCREC_TOKENIZER = ("tokenizer.json", "tokenizer_config.json")
# a separate index → preference adapter: a ranker tuned for letters is a poor writer, and a
# writer needs all four attention projections and its own prompt format (docs/decode.md)
DECODE_DIR = "decode"
DECODE_FILES = ("adapter_config.json", "adapter_model.safetensors", "ulmrec_config.json")
# a new user's path (ulmrec.live): the retriever itself and the P-ID indexer
RETRIEVER_DIR = "retriever"
RETRIEVER_FILES = ("model.json", "model.safetensors", "items.json")
INDEXER_DIR = "indexer"
INDEXER_FILES = ("indexer.json", "indexer.safetensors")


class BundleError(Exception):
    """A bundle that cannot be used: missing or corrupt files, wrong format."""


@dataclass
class Manifest:
    """bundle.json: what train.export writes and load_bundle / the Hub client read.

    The optional parts are None when absent; each is a small dict of its own (the
    second adapters name their run, tokenizer and backbone reference)."""
    dataset: dict                        # name, fingerprint, users, items, interactions
    backbone: dict = field(default_factory=dict)  # ulmrec.backbone.backbone_reference: id, source, …
    run: str | None = None               # the pipeline run whose adapter this is
    format: str = FORMAT
    created: str = ""
    ulmrec_version: str = ""
    adapter: str = "best"                # which of the run's adapters: best / last
    index_kind: str = "none"             # pid (ours) / release (the authors') / none
    preference_source: str = "none"
    retriever: str = "lrurec"
    load_in_4bit: bool = False
    includes_data: bool = False          # items.parquet + users.parquet carried, else ULMREC_DATA
    base_model: str | None = None        # the base model's Hub id (adapter_config.json names it)
    lcrec: dict | None = None            # LC-Rec part: items, tokenizer, split, users, metrics, backbone
    decode: dict | None = None           # decode adapter: run, adapter, tokenizer, prompt_format, …
    outcomes: dict | None = None         # up/same/down counts of outcomes.parquet
    live: dict = field(default_factory=dict)    # {"retriever": {...}, "indexer": {...}} where carried
    files: dict = field(default_factory=dict)   # relative path → sha256

    @property
    def name(self) -> str:
        return self.dataset.get("name", "?")

    @classmethod
    def from_dict(cls, values: dict, where: str = MANIFEST) -> "Manifest":
        """A manifest from bundle.json's mapping; keys this version does not know are dropped
        (a newer writer's optional part), a missing required key is a BundleError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            log.info("%s: keys this version does not read: %s", where, ", ".join(unknown))
        if not isinstance(values.get("dataset"), dict) or "name" not in values["dataset"]:
            raise BundleError(f"{where}: 'dataset' missing, or without its name")
        if not isinstance(values.get("backbone", {}), dict):
            raise BundleError(f"{where}: 'backbone' is not a mapping")
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        """bundle.json's mapping: the optional parts only where present."""
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items()
                if not (k in ("lcrec", "decode", "outcomes", "live") and not v)}


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a bundle folder, unchecked (verify_bundle checks the files too)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not (folder / MANIFEST).exists():
        raise BundleError(f"{folder}: missing {MANIFEST} (not an ULMRec bundle, or a partial copy)")
    try:
        values = json.loads((folder / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{folder / MANIFEST}: corrupt manifest ({e})") from None
    if not isinstance(values, dict):
        raise BundleError(f"{folder / MANIFEST}: expected a mapping, got {type(values).__name__}")
    if values.get("format") != FORMAT:
        raise BundleError(f"{folder / MANIFEST}: format {values.get('format')!r}, expected {FORMAT!r}")
    return Manifest.from_dict(values, str(folder / MANIFEST))


def verify_bundle(folder: str | Path, check_hashes: bool = True) -> Manifest:
    """The manifest of a complete bundle; BundleError naming what is missing or corrupt."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    needed = list(REQUIRED_FILES) + (list(DATA_FILES) if manifest.includes_data else [])
    needed += _tokenizer_files(folder)
    for part, sub, files in ((manifest.lcrec, LCREC_DIR, LCREC_FILES),
                             (manifest.decode, DECODE_DIR, DECODE_FILES)):
        if part:       # an optional second adapter: its files, its own tokenizer or none
            own = part.get("tokenizer", "own") == "own"
            needed += [f"{sub}/{f}" for f in files + (_tokenizer_files(folder / sub) if own else ())]
    if manifest.outcomes:
        needed.append(OUTCOMES)
    for key, sub, files in (("retriever", RETRIEVER_DIR, RETRIEVER_FILES),
                            ("indexer", INDEXER_DIR, INDEXER_FILES)):
        if manifest.live.get(key):
            needed += [f"{sub}/{f}" for f in files]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise BundleError(f"{folder}: incomplete bundle, missing {', '.join(missing)}")
    if check_hashes:
        for name, digest in manifest.files.items():
            path = folder / name
            if not path.is_file():
                raise BundleError(f"{folder}: incomplete bundle, missing {name}")
            if sha256_file(path) != digest:
                raise BundleError(f"{path}: corrupt (sha256 differs from the manifest)")
    return manifest


def _tokenizer_files(folder: Path) -> tuple[str, ...]:
    return (TOKENIZER_REF,) if (folder / TOKENIZER_REF).is_file() else TOKENIZER_FILES
