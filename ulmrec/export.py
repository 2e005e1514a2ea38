"""Export a fine-tuned run as a bundle (ulmrec/bundle_format.py): adapter, tokenizer, user
index, candidates, metrics, config and a Hub model card, in one folder swapped in atomically
(the command line is train/export.py).

    python -m train.export --dataset gift-cards --run-name demo --out assets/demo --no-include-data
    python -m train.export --dataset games --run-name ulmrec          # → runs/games/bundle

`--include-data` (default) adds the items and users tables (titles, histories, targets,
preferences): a bundle for the Hub that loads anywhere. Without it the bundle holds only
what this project made and is joined at load time with the dataset under ULMREC_DATA.
"""
from __future__ import annotations

import filecmp
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from safetensors.torch import load_file, save_file

from . import __version__
from .backbone import embedded_reference, is_embedded, load_tokenizer
from .bundle import ServeConfig, dataset_tables
from .bundle_format import (DECODE_DIR, INDEXER_DIR, LCREC_DIR, MANIFEST, MOVES, OUTCOMES,
                            RETRIEVER_DIR, Manifest, verify_bundle)
from .config import from_dict
from .data import load_dataset
from .decode import DecodeSettings
from .evaluate import results_stem
from .hubcard import clean_for_hub, hub_base_id
from .hubcard import model_card as hub_model_card
from .hubcard import scrub
from .indexing.encoder import embed_cached, load_encoder
from .indexing.table import parse_token_string
from .item_tokens import FILE as ITEM_TOKENS_FILE
from .line_head import FILE as LINE_HEAD_FILE
from .metrics import target_ranks
from .paths import atomic_dir, repo_path, runs_root, sha256_file
from .ranker import load_candidates, load_pid_table, load_preference_series
from .tasks import user_index_strings

log = logging.getLogger("ulmrec.export")

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json",
                   "tokenizer_ref.json")  # newer runs: a reference to the base tokenizer + added tokens
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class ExportConfig:
    """Which run to export and where."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name or folder"})
    run_name: str = field(default="ulmrec", metadata={"help": "runs/<dataset>/finetune/<run_name>"})
    adapter: str = field(default="best", metadata={"help": "best | last"})
    out: str | None = field(default=None, metadata={"help": "bundle folder (default runs/<dataset>/bundle)"})
    full_tokenizer: bool = field(default=True, metadata={
        "help": "write the tokenizer's own files (tokenizer.json, …) even when the run saved only a "
                "reference to its base (tokenizer_ref.json): transformers, peft and the card's "
                "snippet need them"})
    include_data: bool = field(default=True, metadata={
        "help": "carry items/users tables (titles, histories, preferences) in the bundle"})
    results_dir: str = field(default="results", metadata={"help": "where train.evaluate wrote <dataset>.json"})
    config_file: str | None = field(default=None, metadata={
        "help": "pipeline YAML copied into the bundle as config.yaml (default: the run's config)"})
    repo_id: str | None = field(default=None, metadata={"help": "Hub repo id named in the model card"})
    base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the base model for adapter_config.json and the card (default: the "
                "backbone's Hub id, or the one a local backbone folder was saved from)"})
    lcrec: str = field(default="", metadata={
        "help": "LC-Rec run to carry as lcrec/ (runs/<dataset>/lcrec[/<tag>], made by train.lcrec): "
                "the app's whole-catalogue mode"})
    decode: str = field(default="", metadata={
        "help": "fine-tuning run (runs/<dataset>/finetune/<decode>) whose adapter writes the "
                "decode panel's text, carried as decode/ (e.g. configs/decode-games.yaml's run)"})
    decode_adapter: str = field(default="last", metadata={
        "help": "best | last of the decode run (its validation metric is next-item, not decoding)"})
    decode_contrast: float | None = field(default=None, metadata={
        "help": "index contrast weight the bundle decodes with (chosen on validation users with "
                "`bench.decode --contrast`); default ulmrec.decode.DecodeSettings.contrast"})

    def __post_init__(self):
        if self.decode_contrast is not None:      # DecodeSettings holds the rule for a weight
            try:
                DecodeSettings(contrast=self.decode_contrast)
            except ValueError as e:
                raise ValueError(f"--decode-contrast: {e}") from None


def bundle_dir(cfg: ExportConfig, ds_name: str) -> Path:
    return repo_path(cfg.out) if cfg.out else runs_root() / ds_name / "bundle"


def backbone_reference(cfg: dict) -> dict:
    """Enough to fetch the exact same base weights again: id + file hash or revision."""
    if cfg.get("tiny_backbone"):
        return {"id": "tiny-random-llama", "note": "seeded random Llama (tests and smoke runs only)"}
    name = cfg.get("backbone")
    if is_embedded(name):  # None: the default packaged backbone
        return embedded_reference(name)
    ref = {"id": str(name)}
    config = Path(name) / "config.json"
    if config.exists():
        ref["config_sha256"] = sha256_file(config)
    return ref


def _index_table(ds, run_cfg) -> pd.DataFrame:
    """reviewerID, index string and (for token indices) the codes a..d."""
    kind = run_cfg.index_kind
    pid = load_pid_table(ds.name, run_cfg.index_run) if kind == "pid" else None
    strings = user_index_strings(ds, kind, pid)
    users = ds.users.sort_values("user")
    table = pd.DataFrame({"reviewerID": users["reviewerID"].astype(str).to_numpy(),
                          "index": [strings[u] if strings is not None else "" for u in users["user"]]})
    if kind in ("pid", "release"):
        codes = [parse_token_string(s) for s in table["index"]]
        for lv, letter in enumerate("abcd"[: len(codes[0])]):
            table[letter] = [c[lv] for c in codes]
    return table


def _candidates(ds, run_cfg) -> pd.DataFrame:
    """Both splits' retrieved lists, keyed by reviewerID and asin (stable across dense ids)."""
    asin = dict(zip(ds.items["item"].astype(int), ds.items["asin"]))
    rid = dict(zip(ds.users["user"].astype(int), ds.users["reviewerID"]))
    frames = []
    for split in ("val", "test"):
        c = load_candidates(ds, run_cfg, split)
        frames.append(pd.DataFrame({
            "reviewerID": [rid[int(u)] for u in c["user"]], "split": split,
            "candidates": [[asin[int(i)] for i in cs] for cs in c["candidates"]],
            "scores": [list(map(float, s)) for s in c["scores"]]}))
    return pd.concat(frames, ignore_index=True)


def _outcomes(ds, src: Path) -> tuple[pd.DataFrame, dict] | None:
    """Where the evaluated model put each test user's real item against the retriever's
    order, from train.evaluate's per-user predictions of this run (the users it sampled
    whose item was retrieved): reviewerID, retriever_rank, llm_rank (1 = first) and moved
    (up / same / down). The app counts and filters by it, so that one user's screen is seen
    beside how often the model helps and hurts. None when the run was never evaluated."""
    path = src.parent / "test_predictions.parquet"
    if not path.exists():
        return None
    pred = pd.read_parquet(path)
    pos = np.array([list(c).index(t) if t in list(c) else -1
                    for c, t in zip(pred["candidates"], pred["target"])])
    keep = pos >= 0
    pred, pos = pred[keep], pos[keep]
    llm = target_ranks(np.stack(pred["probs"].to_numpy()), pos).astype(int)
    retr = pos + 1                       # the candidates are listed in the retriever's order
    rid = dict(zip(ds.users["user"].astype(int), ds.users["reviewerID"]))
    table = pd.DataFrame({"reviewerID": [rid[int(u)] for u in pred["user"]],
                          "retriever_rank": retr, "llm_rank": llm,
                          "moved": np.select([llm < retr, llm > retr], ["up", "down"], "same")})
    counts = table["moved"].value_counts()
    summary = {"users": len(table), **{k: int(counts.get(k, 0)) for k in MOVES},
               "source": "train.evaluate's sampled test users whose item was retrieved"}
    return table, summary


def _metrics(cfg: ExportConfig, ds_name: str) -> dict:
    path = results_stem(cfg.results_dir, ds_name).with_suffix(".json")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `python -m train.evaluate --dataset {ds_name} "
                                f"--runs {cfg.run_name}` before exporting")
    payload = json.loads(path.read_text())
    if cfg.run_name not in payload.get("results", {}):
        raise ValueError(f"{path} has no results for run '{cfg.run_name}' (has: "
                         f"{', '.join(payload.get('results', {}))}); evaluate it first")
    return payload


def _lcrec_part(folder: str, ds) -> tuple[Path, dict, pd.DataFrame, dict]:
    """(adapter dir, its config, item index keyed by asin, evaluation) of an LC-Rec run, or of
    the lcrec/ part of an existing bundle (re-exporting a bundle keeps its LC-Rec model: that
    model depends on neither the user index nor the ranker)."""
    run = repo_path(folder)
    if (run / "lcrec_config.json").exists() and (run / "item_index.parquet").exists():
        return (run, json.loads((run / "lcrec_config.json").read_text()),
                pd.read_parquet(run / "item_index.parquet"),
                json.loads((run / "metrics.json").read_text()))
    adapter = run / "finetune" / "adapter"
    if not (adapter / "lcrec_config.json").exists():
        raise FileNotFoundError(f"{adapter}: no LC-Rec adapter (run `python -m train.lcrec --dataset "
                                f"{ds.name}` first)")
    config = json.loads((adapter / "lcrec_config.json").read_text())
    # the item index is shared by the tagged runs of one run folder
    index_file = next((d / "index" / "item_index.parquet" for d in (run, run.parent)
                       if (d / "index" / "item_index.parquet").exists()), None)
    if index_file is None:
        raise FileNotFoundError(f"{run}: no index/item_index.parquet beside the LC-Rec adapter")
    table = pd.read_parquet(index_file)
    asin = dict(zip(ds.items["item"].astype(int), ds.items["asin"]))
    unknown = sorted(set(table["item"].astype(int)) - set(asin))
    if unknown:
        raise ValueError(f"{index_file}: {len(unknown)} items not in {ds.name} (e.g. {unknown[:3]})")
    table = table.assign(asin=[asin[int(i)] for i in table["item"]])
    table = table[["asin", "index"] + [c for c in "abcd" if c in table]]
    split = config.get("eval_split", "test")
    metrics_file = run / "eval" / f"metrics_{split}.json"
    if not metrics_file.exists():
        raise FileNotFoundError(f"{metrics_file} not found: evaluate the LC-Rec run first "
                                f"(`python -m train.lcrec --dataset {ds.name} --stages evaluate`)")
    return adapter, config, table, json.loads(metrics_file.read_text())


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Byte-identical tokenizers: by the reference to the base + added tokens where both have
    one (a full tokenizer written beside it for standard tools changes nothing), else by files."""
    ref = "tokenizer_ref.json"
    names = (ref,) if (a / ref).exists() and (b / ref).exists() else TOKENIZER_FILES
    return all((a / n).exists() == (b / n).exists() and (
        not (a / n).exists() or filecmp.cmp(a / n, b / n, shallow=False)) for n in names)


def _copy_part(adapter: Path, ranker: Path, part: Path, config_name: str) -> tuple[Path, bool]:
    """Copy a second adapter (+ its config) into the bundle folder `part`; its tokenizer too
    unless it is the ranker's (one shared copy saves 3.7 MB). Returns (part, shared)."""
    part.mkdir()
    tok = adapter
    if (adapter.parent / MANIFEST).exists() and not any((adapter / n).exists() for n in TOKENIZER_FILES):
        tok = adapter.parent          # a part taken from a bundle shares that bundle's tokenizer
    shared = _same_tokenizer(tok, ranker)
    for name in ADAPTER_FILES + (config_name,):
        if (adapter / name).exists():
            shutil.copy2(adapter / name, part / name)
    for name in () if shared else TOKENIZER_FILES:
        if (tok / name).exists():
            shutil.copy2(tok / name, part / name)
    return part, shared


def _decode_part(cfg: ExportConfig, ds, run_cfg) -> tuple[Path, dict]:
    """(adapter dir, its config) of an index → preference run that reads the same user index."""
    src = runs_root() / ds.name / "finetune" / cfg.decode / cfg.decode_adapter
    if not (src / "ulmrec_config.json").exists():
        raise FileNotFoundError(f"{src}: no trained adapter (see configs/decode-{ds.name}.yaml)")
    config = json.loads((src / "ulmrec_config.json").read_text())
    if config.get("index_kind") != run_cfg.index_kind:
        raise ValueError(f"{src}: the decode run reads the {config.get('index_kind')!r} user index, the "
                         f"ranker {run_cfg.index_kind!r}: one bundle shows one index")
    return src, config


def _live_parts(ds, run_cfg, tmp: Path) -> dict:
    """The retriever (and, for a P-ID index, the indexer) that serve a history not in the
    table (ulmrec.live); {} when the run's retriever is the random baseline."""
    live: dict = {}
    if run_cfg.retriever != "random":
        src = runs_root() / ds.name / "retrieval" / run_cfg.retriever
        if not (src / "model.safetensors").exists():
            raise FileNotFoundError(f"{src}: no trained retriever to carry (run `python -m "
                                    f"train.retrieve --dataset {ds.name} --model {run_cfg.retriever}`)")
        part = tmp / RETRIEVER_DIR
        part.mkdir()
        for name in ("model.json", "model.safetensors"):
            shutil.copy2(src / name, part / name)
        spec = json.loads((src / "model.json").read_text())
        asin = dict(zip(ds.items["item"].astype(int), ds.items["asin"].astype(str)))
        # the retriever's item ids are the dataset's dense ids (0 = padding): keyed by asin here
        (part / "items.json").write_text(json.dumps([asin.get(i, "") for i in range(spec["num_items"] + 1)]))
        live["retriever"] = {"model": spec["model"], "max_len": spec["kwargs"]["max_len"]}
    if run_cfg.index_kind == "pid":
        src = runs_root() / ds.name / run_cfg.index_run
        if (src / "model.safetensors").exists() and (src / "summary.json").exists():
            live["indexer"] = _indexer_part(ds, src, tmp / INDEXER_DIR)
        else:
            log.warning("%s has the index table but not the indexer's weights: the bundle serves "
                        "new users with the index the LLM predicts from their history", src)
    return live


def _indexer_part(ds, src: Path, part: Path) -> dict:
    """indexer/: the index run's A and RQ-VAE, plus a new user's ID query: the mean of the
    table users' ID embeddings (a new user has no original ID to embed)."""
    summary = json.loads((src / "summary.json").read_text())
    settings = summary["settings"]
    enc = load_encoder(settings.get("encoder") or None, settings.get("max_length", 256))
    # the same list, in the same order, as the index run encoded (build_review_sets): a cache hit
    rids = ds.users.sort_values("user")["reviewerID"].astype(str).tolist()
    ids, _ = embed_cached(enc, rids, desc=f"{ds.name} user IDs")
    tensors = load_file(src / "model.safetensors")
    tensors["new_user_query"] = torch.from_numpy(np.asarray(ids, np.float32).mean(0))
    part.mkdir()
    save_file(tensors, part / "indexer.safetensors")
    text_kind = summary.get("reviews", {}).get("text_kind", "")
    (part / "indexer.json").write_text(json.dumps({
        "config": settings, "encoder_fingerprint": enc.fingerprint, "text_kind": text_kind,
        "leak_prone": summary.get("leak_prone", False)}, indent=1))
    return {"levels": settings["levels"], "codebook_size": settings["codebook_size"],
            "text_kind": text_kind, "leak_prone": summary.get("leak_prone", False)}


def model_card(manifest: Manifest, metrics: dict, repo_id: str | None, base_id: str | None = None,
               standard_tokenizer: bool = True, run_cfg=None) -> str:
    """Hub model card (ulmrec.hubcard) + the LC-Rec part and the data note of this bundle."""
    card = hub_model_card(manifest, metrics, repo_id, base_id, standard_tokenizer,
                          tuple(run_cfg.tasks) if run_cfg else None,
                          bool(run_cfg and run_cfg.residual))
    tail = _lcrec_card(manifest.lcrec)
    if manifest.decode:
        tail += (f"\n## Decoding a user index\n\n`{DECODE_DIR}/` holds a second adapter trained to write a "
                 f"user's preferences from their index or any prefix of it "
                 f"({manifest.decode['prompt_format']} prompts; greedy with index contrast weight "
                 f"{manifest.decode.get('contrast', DecodeSettings.contrast)}): "
                 f"`bundle.decode('<a_1><b_2>')`.\n")
    if not manifest.includes_data:
        tail += "\nThis bundle carries no data: it is joined at load time with the dataset under ULMREC_DATA.\n"
    return card.rstrip("\n") + "\n\n" + tail if tail else card


def _lcrec_card(part: dict | None) -> str:
    if not part:
        return ""
    m = part["metrics"]
    return (f"## Whole-catalogue mode (LC-Rec)\n\n`lcrec/` holds an LC-Rec adapter (item indices over "
            f"{part['items']} items, trie-constrained beam search) that recommends from the whole "
            f"catalogue, no retriever: HR@10 {m['HR@10']:.4f}, NDCG@10 {m['NDCG@10']:.4f} on "
            f"{part['users']} {part['split']} users. `bundle.recommend_catalogue(user)`.\n")


def export(cfg: ExportConfig) -> Path:
    ds = load_dataset(cfg.dataset)
    src = runs_root() / ds.name / "finetune" / cfg.run_name / cfg.adapter
    if not (src / "ulmrec_config.json").exists():
        raise FileNotFoundError(f"{src}: no trained adapter (run `python -m train.finetune --dataset "
                                f"{cfg.dataset} --run-name {cfg.run_name}`)")
    run_cfg_dict = json.loads((src / "ulmrec_config.json").read_text())
    run_cfg = from_dict(ServeConfig, run_cfg_dict, known_only=True)
    metrics = _metrics(cfg, ds.name)
    lcrec = _lcrec_part(cfg.lcrec, ds) if cfg.lcrec else None
    decode = _decode_part(cfg, ds, run_cfg) if cfg.decode else None
    out = bundle_dir(cfg, ds.name)

    def fill(tmp: Path) -> None:
        # soft item tokens and the line scorer's head: where the run has them
        for name in ADAPTER_FILES + TOKENIZER_FILES + (ITEM_TOKENS_FILE, LINE_HEAD_FILE):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        (tmp / "ulmrec_config.json").write_text(json.dumps(run_cfg_dict, indent=1))
        _index_table(ds, run_cfg).to_parquet(tmp / "user_index.parquet", index=False)
        _candidates(ds, run_cfg).to_parquet(tmp / "candidates.parquet", index=False)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
        outcomes = _outcomes(ds, src)
        if outcomes is not None:
            outcomes[0].to_parquet(tmp / OUTCOMES, index=False)
        fusion = src.parent / "fusion.json"     # λ of the retriever prior, fitted on validation users
        if fusion.exists():
            shutil.copy2(fusion, tmp / "fusion.json")
        if cfg.config_file:
            shutil.copy2(cfg.config_file, tmp / "config.yaml")
        else:
            (tmp / "config.yaml").write_text(yaml.safe_dump(run_cfg_dict, sort_keys=False))
        if cfg.include_data:
            prefs, _ = load_preference_series(ds, run_cfg.preference_source)
            items, users = dataset_tables(ds, prefs)
            items.to_parquet(tmp / "items.parquet", index=False)
            users.to_parquet(tmp / "users.parquet", index=False)
        manifest = Manifest(
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ulmrec_version=__version__, run=cfg.run_name, adapter=cfg.adapter,
            dataset={"name": ds.name, "fingerprint": ds.info.get("fingerprint"),
                     **{k: v for k, v in ds.stats().items() if k in ("users", "items", "interactions")}},
            backbone=backbone_reference(run_cfg_dict), index_kind=run_cfg.index_kind,
            preference_source=run_cfg.preference_source, retriever=run_cfg.retriever,
            load_in_4bit=run_cfg.load_in_4bit, includes_data=cfg.include_data)
        if lcrec:
            adapter, lc_cfg, items, result = lcrec
            part, shared = _copy_part(adapter, src, tmp / LCREC_DIR, "lcrec_config.json")
            items.to_parquet(part / "item_index.parquet", index=False)
            (part / "metrics.json").write_text(json.dumps(result, indent=1))
            manifest.lcrec = {"items": len(items), "tokenizer": "shared" if shared else "own",
                              "split": result["split"], "users": result["users"],
                              "metrics": result["metrics"], "backbone": backbone_reference(lc_cfg)}
        if outcomes is not None:
            manifest.outcomes = outcomes[1]
        manifest.live = _live_parts(ds, run_cfg, tmp)
        if decode:
            dsrc, dcfg = decode
            _, shared = _copy_part(dsrc, src, tmp / DECODE_DIR, "ulmrec_config.json")
            manifest.decode = {"run": cfg.decode, "adapter": cfg.decode_adapter,
                               "tokenizer": "shared" if shared else "own",
                               "prompt_format": dcfg.get("prompt_format"),
                               "tasks": dcfg.get("tasks"), "max_steps": dcfg.get("max_steps"),
                               "backbone": backbone_reference(dcfg),
                               "contrast": DecodeSettings.contrast if cfg.decode_contrast is None
                               else cfg.decode_contrast}
        # standard tools read the base from adapter_config.json: its Hub id, never a local path
        base_id = cfg.base_model or hub_base_id(manifest.backbone, run_cfg_dict)
        if base_id is None:
            log.warning("no Hub id known for the base model %s: adapter_config.json will name none "
                        "(pass --base-model owner/name)", manifest.backbone.get("id"))
        manifest.base_model = base_id
        if cfg.full_tokenizer and not (tmp / "tokenizer.json").exists():
            # standard tools cannot read tokenizer_ref.json: write the tokenizer itself too
            load_tokenizer(src).save_pretrained(tmp)
        clean_for_hub(tmp, base_id)
        manifest = Manifest.from_dict(scrub(manifest.to_dict()))
        (tmp / "README.md").write_text(model_card(manifest, metrics, cfg.repo_id, base_id,
                                                  (tmp / "tokenizer.json").exists(), run_cfg))
        manifest.files = {p.relative_to(tmp).as_posix(): sha256_file(p)
                          for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=1))
        verify_bundle(tmp)

    atomic_dir(out, fill)
    files = [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files) / 1e6
    log.info("bundle %s: %d files, %.1f MB%s", out, len(files), size,
             "" if cfg.include_data else " (no data: joined with ULMREC_DATA at load time)")
    return out
