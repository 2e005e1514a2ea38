"""LC-Rec end to end: item index → alignment tuning → generative full-catalogue evaluation
(the command line is train/lcrec.py).

Writes runs/<dataset>/lcrec/ (finetune/ and eval/ under lcrec/<tag>/ with --tag):
  index/     item_index.parquet (item, a..d, index, title), summary.json (collisions, usage), ckpt/
  finetune/  checkpoint/ (resumable), adapter/ (LoRA + index-token rows + tokenizer)
  eval/      metrics_<split>.json, topn_<split>.parquet
Each stage skips work already done (index table present; finetune state done; metrics
present for the same settings); --force redoes the stages named in --stages.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..backbone import save_tokenizer
from ..checkpoint import read_state
from ..config import flat_dict
from ..data import load_dataset
from ..indexing.encoder import embed_cached, load_encoder
from ..indexing.fit import IndexConfig
from ..metrics import metrics_from_ranks, ranks_in_list, sample_eval_users
from ..model import add_index_tokens, encode, index_vocabulary, response_loss, wrap_lora
from ..paths import atomic_dir, atomic_write, atomic_write_json, runs_root
from ..preferences.run import load_preferences
from ..ranker import RankerConfig, load_base, load_candidates, load_preference_series, load_ranker
from ..report import markdown_table
from ..tasks import task_counts
from ..trainer import TrainingArguments, fit
from .generate import generate_topn
from .item_index import build_item_index, index_strings, item_texts, llm_embed
from .tasks import LcRecData, eval_examples, lcrec_data, sample_users, training_examples
from .trie import item_token_ids

log = logging.getLogger("ulmrec.lcrec")
STAGES = ("index", "finetune", "evaluate")


@dataclass
class LcRecConfig:
    """LC-Rec: learned item indices and generative recommendation (Zheng et al., 2024)."""
    dataset: str = field(default="games", metadata={"help": "dataset name (ulmrec.data)"})
    stages: tuple[str, ...] = field(default=STAGES, metadata={"help": f"subset of {STAGES}"})
    force: bool = field(default=False, metadata={"help": "redo the named stages"})
    resume: bool = field(default=True, metadata={
        "help": "reuse what earlier runs left (--no-resume = --force: the pipeline's fresh run)"})
    out: str = field(default="", metadata={"help": "run folder ('' → runs/<dataset>/lcrec)"})
    tag: str = field(default="", metadata={
        "help": "finetune/ and eval/ go to <run folder>/<tag>/ (the item index stays shared)"})
    # item index (the user index's RQ-VAE and collision handling)
    item_encoder: str = field(default="minilm", metadata={
        "help": "minilm (the review encoder) or llm (the backbone, mean-pooled)",
        "choices": ("minilm", "llm")})
    # (--index-epochs, --index-e-dim, …: the user index's IndexConfig, its run folder 'lcrec')
    index: IndexConfig = field(default_factory=lambda: IndexConfig(out="lcrec"), metadata={
        "prefix": "index_", "fields": ("epochs", "e_dim", "levels", "codebook_size", "batch_size", "lr")})
    # model (--backbone, --lora-r, …, --max-len: the ranker's RankerConfig, prompts of 512 tokens)
    llm: RankerConfig = field(default_factory=lambda: RankerConfig(max_len=512), metadata={
        "prefix": "", "fields": ("backbone", "tiny_backbone", "prompt_format", "lora_r", "lora_alpha",
                                 "lora_dropout", "lora_targets", "max_len")})
    # tasks
    tasks: tuple[str, ...] = field(default=("seq", "mut", "asy", "ite", "per"), metadata={
        "help": "seq mut asy ite per (ite / per only where intents / preferences exist)"})
    preference_source: str = field(default="auto", metadata={
        "help": "auto / release / local / openai / extractive / none (per task)"})
    intent_source: str = field(default="auto", metadata={"help": "preferences-stage intents; none = skip ite"})
    max_history: int = 20
    max_prefixes_per_user: int = 0
    train_users: int = field(default=0, metadata={"help": "user-side examples from this many random users (0 = all)"})
    # training
    learning_rate: float = 5e-4
    batch_size: int = 4
    num_epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "optimizer steps (0 = num_epochs)"})
    warmup_steps: int = 20
    ckpt_every: int = 25
    stop_after: int = field(default=0, metadata={
        "help": "leave after this many optimizer steps, resumable, as if interrupted (time boxes)"})
    # evaluation
    eval_split: str = field(default="test", metadata={"choices": ("val", "test")})
    eval_users: int = field(default=0, metadata={
        "help": "random users evaluated (0 = all); the same users as train.evaluate --max-users with this seed"})
    reference_retriever: str = field(default="lrurec", metadata={
        "help": "retriever whose top-20 lists are scored on the same users, beside popularity "
                "('' = none; skipped with a note when its candidates are missing)"})
    beams: int = 20
    topn: int = 10
    exclude_history: bool = field(default=True, metadata={
        "help": "never generate an item of the user's history (the retriever masks them too)"})
    eval_batch_size: int = 2
    seed: int = 42
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})

    def index_config(self) -> IndexConfig:
        return replace(self.index, dataset=self.dataset, seed=self.seed, threads=self.threads)

    def training_args(self):
        return TrainingArguments(learning_rate=self.learning_rate, num_epochs=self.num_epochs,
                                 max_steps=self.max_steps, batch_size=self.batch_size,
                                 warmup_steps=self.warmup_steps, stop_after=self.stop_after,
                                 ckpt_every=self.ckpt_every, eval_every=0)

    def ranker_config(self) -> RankerConfig:
        return replace(self.llm, dataset=self.dataset)


def run_dir(cfg: LcRecConfig, ds_name: str) -> Path:
    return Path(cfg.out) if cfg.out else runs_root() / ds_name / "lcrec"


def model_dir(cfg: LcRecConfig, ds_name: str) -> Path:
    """Where finetune/ and eval/ live: the run folder, or its <tag>/ sub-folder."""
    return run_dir(cfg, ds_name) / cfg.tag if cfg.tag else run_dir(cfg, ds_name)


def outputs(cfg: LcRecConfig, ds_name: str) -> list[Path]:
    """What a finished run leaves (the pipeline checks these; train.export reads them)."""
    mdir = model_dir(cfg, ds_name)
    out = [run_dir(cfg, ds_name) / "index" / "item_index.parquet"]
    if "finetune" in cfg.stages:
        out.append(mdir / "finetune" / "adapter" / "adapter_model.safetensors")
    if "evaluate" in cfg.stages:
        out.append(mdir / "eval" / f"metrics_{cfg.eval_split}.json")
    return out


# ---------------------------------------------------------------- stage 1: item index
def stage_index(cfg: LcRecConfig, ds, out: Path) -> pd.DataFrame:
    folder = out / "index"
    if (folder / "item_index.parquet").exists() and not (cfg.force and "index" in cfg.stages):
        return pd.read_parquet(folder / "item_index.parquet")
    t0 = time.time()
    items, texts = item_texts(ds)
    if cfg.item_encoder == "minilm":
        enc = load_encoder()
        emb, enc_stats = embed_cached(enc, texts, desc=f"{ds.name} items")
        enc_stats["model"] = enc.name
    else:
        model, tok = load_base(cfg.ranker_config())
        emb = llm_embed(model.eval(), tok, texts)
        enc_stats = {"model": "backbone (mean-pooled last hidden state)", "texts": len(texts)}
    icfg = cfg.index_config()
    table, report = build_item_index(items, emb, icfg, ckpt_dir=folder / "ckpt")
    table = table.merge(ds.items[["item", "title"]], on="item", how="left")
    summary = {"dataset": ds.name, "items": len(table), "encoder": enc_stats,
               "item_text": "title + description" if "description" in ds.items else "title",
               "settings": asdict(icfg), "seconds": round(time.time() - t0, 1), **report}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "item_index.parquet", lambda p: table.to_parquet(p, index=False))
    atomic_write_json(folder / "summary.json", summary)
    c = report["collisions"]
    log.info("item index: %d items; colliding before %d (%d groups) → after Sinkhorn %d → "
             "final %d (fallback moved %d)", len(table), c["before"]["colliding_users"],
             c["before"]["groups"], c["after_sinkhorn"]["colliding_users"],
             c["after"]["colliding_users"], c["fallback_moved"])
    return table


# ---------------------------------------------------------------- stage 2: finetune
def _task_data(cfg: LcRecConfig, ds, table: pd.DataFrame):
    notes = []
    pref = intent = None
    if "per" in cfg.tasks and cfg.preference_source != "none":
        try:
            pref, n = load_preference_series(ds, cfg.preference_source)
            notes += n
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"per skipped: {err}")
    if "ite" in cfg.tasks and cfg.intent_source != "none":
        try:
            intent = load_preferences(ds, task="intent", backend=cfg.intent_source)
        except (FileNotFoundError, ValueError) as err:
            notes.append(f"ite skipped: no intents ({str(err).splitlines()[0]})")
    return lcrec_data(ds, index_strings(table), pref, intent), notes


def stage_finetune(cfg: LcRecConfig, ds, table: pd.DataFrame, out: Path) -> bool:
    """Train (or resume) the adapter; False when it stopped early on purpose (--stop-after)."""
    folder = out / "finetune"
    ckpt, adapter = folder / "checkpoint", folder / "adapter"
    if cfg.force and "finetune" in cfg.stages:
        shutil.rmtree(folder, ignore_errors=True)
    state = read_state(ckpt) or {"step": 0, "done": False}
    if state["done"] and adapter.exists():
        log.info("finetune already done (%d steps)", state["step"])
        return True
    t0 = time.time()
    data, notes = _task_data(cfg, ds, table)
    users = sample_users(ds, cfg.train_users, cfg.seed)
    examples = training_examples(data, cfg.tasks, cfg.max_history, cfg.max_prefixes_per_user,
                                 users, cfg.seed)
    if cfg.max_steps:  # (already shuffled) only what the run will reach gets tokenized
        examples = examples[: cfg.max_steps * cfg.batch_size]
    counts = task_counts(examples)
    log.info("examples used per task: %s; notes: %s", counts, notes)

    torch.manual_seed(cfg.seed)
    llm = cfg.ranker_config()
    model, tok = load_base(llm)
    new_ids = add_index_tokens(model, tok, index_vocabulary(cfg.index.levels, cfg.index.codebook_size))
    model = wrap_lora(model, llm.lora_r, llm.lora_alpha, llm.lora_dropout, llm.lora_targets, new_ids)
    encoded = [encode(tok, ex, llm.prompt_format, llm.max_len) for ex in examples]

    def save(model, name: str):
        if name != "last":
            return

        def write(tmp: Path):
            model.save_pretrained(tmp, save_embedding_layers=False)  # index rows travel as token deltas
            save_tokenizer(tok, tmp, llm.backbone)  # a reference to the base + added tokens
            # flat, so that the bundle reads its RankerConfig keys with RankerConfig itself
            (tmp / "lcrec_config.json").write_text(json.dumps(flat_dict(cfg), indent=1, default=str))
        atomic_dir(adapter, write)

    fitted = fit(model, encoded, cfg.training_args(), folder, loss_fn=response_loss,
                 pad_id=tok.pad_token_id, seed=cfg.seed, save=save,
                 desc="lcrec finetune")
    if fitted.get("interrupted"):
        return False
    losses = fitted["losses"]
    atomic_write_json(folder / "train_summary.json", {
        "dataset": ds.name, "steps": fitted["steps"], "examples": counts, "notes": notes,
        "train_users": cfg.train_users or ds.num_users, "first_losses": losses[:10],
        "last_losses": losses[-10:],
        "train_seconds_this_process": round(fitted["train_seconds_this_process"], 1),
        "tokens_per_s": round(fitted["train_tokens_per_s"], 1) if fitted["train_tokens_per_s"] else None,
        "total_seconds": round(time.time() - t0, 1), "config": flat_dict(cfg)})
    return True


# ---------------------------------------------------------------- stage 3: evaluate
def load_lcrec(out: Path, cfg: LcRecConfig):
    """(model, tokenizer) of a finished run, eval mode."""
    return load_ranker(out / "finetune" / "adapter", cfg.ranker_config())


def stage_evaluate(cfg: LcRecConfig, ds, table: pd.DataFrame, out: Path) -> dict:
    folder = out / "eval"
    settings = {k: getattr(cfg, k) for k in ("eval_split", "eval_users", "beams", "topn",
                                             "exclude_history", "max_history")}
    settings |= {"prompt_format": cfg.llm.prompt_format, "seed": cfg.seed}
    settings["users"] = "sample_eval_users"   # the user sample train.evaluate draws too
    path = folder / f"metrics_{cfg.eval_split}.json"
    if path.exists() and not (cfg.force and "evaluate" in cfg.stages):
        done = json.loads(path.read_text())
        if done.get("settings") == settings:
            return done
    t0 = time.time()
    model, tok = load_lcrec(out, cfg)
    data = LcRecData(index=index_strings(table), titles={}, texts={}, train=None)
    users = sample_eval_users(ds.users["user"], cfg.eval_users, cfg.seed)
    exs, histories = eval_examples(ds, data, cfg.eval_split, cfg.max_history, users)
    token_items = item_token_ids(tok, table)
    top, stats = generate_topn(model, tok, exs, token_items, n=cfg.topn, beams=cfg.beams,
                               banned_items=histories if cfg.exclude_history else None,
                               fmt=cfg.llm.prompt_format, max_len=cfg.llm.max_len,
                               batch_size=cfg.eval_batch_size, progress=True)
    secs = time.time() - t0
    targets = np.array([ex.target for ex in exs])
    ranks = ranks_in_list(_padded([[i for i, _ in t] for t in top], cfg.topn), targets)
    metrics = _hr_ndcg(ranks)
    valid = all(i in set(token_items.values()) for items in top for i, _ in items)
    result = {"dataset": ds.name, "split": cfg.eval_split, "users": len(exs), "metrics": metrics,
              "all_generated_items_valid": valid, "beam_stats": stats,
              "items_per_user_mean": float(np.mean([len(t) for t in top])) if top else 0.0,
              "seconds": round(secs, 1), "s_per_user": round(secs / max(1, len(exs)), 2),
              "settings": settings,
              "reference": reference_rows(ds, cfg, [ex.user for ex in exs], histories, targets)}
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"user": [ex.user for ex in exs], "target": targets,
                          "items": [[i for i, _ in t] for t in top],
                          "scores": [[s for _, s in t] for t in top], "rank": ranks})
    atomic_write(folder / f"topn_{cfg.eval_split}.parquet", lambda p: frame.to_parquet(p, index=False))
    atomic_write_json(path, result)
    return result


def _padded(lists: list[list[int]], n: int) -> np.ndarray:
    """[U, n] item ids, best first; -1 fills the slots of shorter lists."""
    ranked = np.full((len(lists), n), -1, dtype=np.int64)
    for row, items in enumerate(lists):
        ranked[row, :min(n, len(items))] = items[:n]
    return ranked


def _hr_ndcg(ranks: np.ndarray) -> dict:
    """LC-Rec's metrics (HR = Recall with one target) from 1-based ranks."""
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    return {"HR@1": m["Recall@1"], "HR@5": m["Recall@5"], "NDCG@5": m["NDCG@5"],
            "HR@10": m["Recall@10"], "NDCG@10": m["NDCG@10"]}


def reference_rows(ds, cfg: LcRecConfig, users: list[int], histories: list[list[int]],
                   targets: np.ndarray) -> dict:
    """Full-ranking HR/NDCG of simple references on the same users: most popular training
    items (history excluded) and the retriever's own top list, when its run exists."""
    counts = pd.Series([int(i) for seq in ds.sequences("train").values for i in seq]).value_counts()
    popular = [int(i) for i in counts.index]
    tops = []
    for hist in histories:
        seen = set(hist)
        tops.append([i for i in popular[: cfg.topn + len(seen)] if i not in seen])
    out = {"popularity (training counts)": _hr_ndcg(ranks_in_list(_padded(tops, cfg.topn), targets))}
    if cfg.reference_retriever:
        try:
            cands = load_candidates(ds, RankerConfig(retriever=cfg.reference_retriever), cfg.eval_split)
        except FileNotFoundError as e:
            out["notes"] = [f"retriever reference skipped: {e}"]
            return out
        lists = dict(zip(cands["user"].astype(int), cands["candidates"]))
        tops = [[int(i) for i in lists.get(u, [])] for u in users]
        out[f"{cfg.reference_retriever} (its top list)"] = _hr_ndcg(
            ranks_in_list(_padded(tops, cfg.topn), targets))
    return out


def describe(index_summary: dict | None, result: dict | None) -> str:
    lines = []
    if index_summary:
        c = index_summary["collisions"]
        lines.append(f"item index: {index_summary['items']} items; colliding items before "
                     f"{c['before']['colliding_users']} ({c['before']['groups']} groups) → after "
                     f"Sinkhorn {c['after_sinkhorn']['colliding_users']} → final "
                     f"{c['after']['colliding_users']} (greedy fallback moved {c['fallback_moved']})")
        lines.append("codes used per level: " + " / ".join(
            f"{u['used']}" for u in index_summary["codebook_usage"]))
    if result:
        m = result["metrics"]
        lines.append(f"{result['split']} ({result['users']} users, full ranking over the catalogue):")
        keys = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10")
        rows = {"LC-Rec": m, **{k: v for k, v in result.get("reference", {}).items() if k != "notes"}}
        cells = [[name] + [f"{row[k]:.4f}" for k in keys] for name, row in rows.items()]
        lines.append(markdown_table(["system", *keys], cells, "l" + "r" * len(keys)))
        lines += result.get("reference", {}).get("notes", [])
        lines.append(f"all generated items valid: {result['all_generated_items_valid']}; "
                     f"{result['s_per_user']} s/user")
    return "\n".join(lines)


class UnknownStage(ValueError):
    """--stages names a stage LC-Rec does not have."""


def run(cfg: LcRecConfig) -> dict | None:
    """The stages of `cfg` in order (each skips what is already done); the evaluation result
    when evaluated, None when finetuning stopped early on purpose (--stop-after) or did not
    evaluate. UnknownStage for a stage it does not have."""
    if not cfg.resume:
        cfg.force = True
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise UnknownStage(f"unknown stage(s) {sorted(unknown)}; known: {STAGES}")
    torch.set_num_threads(max(1, cfg.threads))
    ds = load_dataset(cfg.dataset)
    out = run_dir(cfg, ds.name)
    out.mkdir(parents=True, exist_ok=True)
    table = stage_index(cfg, ds, out)  # the later stages need it: built when missing
    mdir = model_dir(cfg, ds.name)
    if "finetune" in cfg.stages and not stage_finetune(cfg, ds, table, mdir):
        return None  # interrupted on purpose: nothing to evaluate yet
    result = stage_evaluate(cfg, ds, table, mdir) if "evaluate" in cfg.stages else None
    summary_path = out / "index" / "summary.json"
    index_summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    log.info("%s", describe(index_summary, result))
    return result
