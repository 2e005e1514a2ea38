"""P2Rec: pre-grouping → user-level SFT → item knowledge augmentation → Base/+CI/+P2Rec retrievers
(the command line is train/p2rec.py).

Outputs in runs/<dataset>/p2rec/:
  groups.json          item → pre-group (k-means over the `--retriever` run's item embeddings)
  sft/                 trainable.safetensors (LoRA + projection + head), checkpoint/ (resume),
                       sft.json (loss history, MSE vs the mean-vector baseline, cost comparison)
  enhanced.safetensors knowledge-enhanced item embeddings [N+1, D] and group distributions [N+1, K]
  agreement.json       C1/C2/C3 shares (paper Fig. 5)
  fusion/<model>-<variant>-s<seed>/  metrics.json, candidates.parquet, model.safetensors
  summary.json, table.md     the Base / +CI / +P2Rec table
Each stage is skipped when its output exists with the same settings; SFT resumes per epoch.
With `--export-retriever`, a +P2Rec model whose validation candidate Recall@20 (mean over
`--fusion-seeds`) beats its Base's is also written to runs/<dataset>/retrieval/<model>-p2rec/,
where the ranker finds it with `--retriever lrurec-p2rec` (train.finetune / train.evaluate).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..backbone import load_backbone, resolve_backbone
from ..config import flat_dict
from ..data import load_dataset
from ..paths import atomic_write, atomic_write_json, runs_root
from ..ranker import RankerConfig, _tiny_llama
from ..report import markdown_table
from ..retrieval import RetrievalConfig, load_retriever
from . import (P2RecLM, add_lora, agreement, enhance_items, instance_examples, item_embeddings,
               kmeans_groups, mean_loss, time_steps, train_sft, train_variant, user_targets)

log = logging.getLogger("ulmrec.p2rec")
STAGES = ("group", "sft", "augment", "fusion", "report")


@dataclass
class P2RecConfig:
    """Run the P2Rec stages on one dataset."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name (ulmrec.data)"})
    retriever: str = field(default="lrurec", metadata={
        "help": "retrieval run (runs/<dataset>/retrieval/<name>) whose item embeddings are grouped"})
    k: int = field(default=32, metadata={"help": "number of pre-groups K"})
    stages: tuple[str, ...] = field(default=STAGES, metadata={"help": "stages to run"})
    # the LLM (--backbone, --tiny-backbone, --lora-r, --lora-alpha, --lora-dropout): the ranker's
    # RankerConfig, of which P2Rec's user-level SFT reads these five
    llm: RankerConfig = field(default_factory=RankerConfig, metadata={
        "prefix": "", "fields": ("backbone", "tiny_backbone", "lora_r", "lora_alpha", "lora_dropout")})
    max_items: int = field(default=50, metadata={"help": "most recent training items per prompt"})
    sft_epochs: int = field(default=3, metadata={"help": "user-level SFT epochs"})
    sft_lr: float = field(default=5e-4, metadata={"help": "AdamW lr of LoRA + projection + head"})
    sft_batch_size: int = field(default=16, metadata={"help": "users per SFT step"})
    sft_users: int = field(default=0, metadata={
        "help": "SFT on this many random users (0 = all): a CPU-sized run on a large dataset; "
                "augmentation and fusion still cover every item and user"})
    timing_examples: int = field(default=64, metadata={
        "help": "examples timed per task for the user- vs instance-level cost comparison"})
    models: tuple[str, ...] = field(default=("sasrec", "lrurec"), metadata={"help": "new retrievers"})
    variants: tuple[str, ...] = field(default=("base", "ci", "p2rec", "emb"), metadata={
        "help": "fusion variants; emb = control: the gate fed the grouping retriever's embeddings"})
    hidden: int = field(default=64, metadata={"help": "new retrievers' width"})
    dropout: float = 0.2
    max_epochs: int = field(default=30, metadata={"help": "new retrievers' epoch cap"})
    patience: int = field(default=5, metadata={"help": "epochs without validation NDCG@10 gain"})
    seed: int = field(default=0, metadata={"help": "seed of k-means and SFT"})
    fusion_seeds: tuple[int, ...] = field(default=(0,), metadata={
        "help": "seeds of the new retrievers; the table gives mean ± std over them"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    export_retriever: bool = field(default=False, metadata={
        "help": "write a +P2Rec model that lifts val candidate Recall@20 to retrieval/<model>-p2rec"})


def out_dir(cfg: P2RecConfig) -> Path:
    return runs_root() / cfg.dataset / "p2rec"


def _signature(cfg: P2RecConfig, *names: str) -> dict:
    flat = flat_dict(cfg)          # the composed LLM settings under their flat names
    return {n: flat[n] for n in names}


GROUP_KEYS = ("dataset", "retriever", "k", "seed")
SFT_KEYS = GROUP_KEYS + ("backbone", "tiny_backbone", "lora_r", "lora_alpha", "lora_dropout",
                         "max_items", "sft_epochs", "sft_lr", "sft_batch_size", "sft_users")


def _fresh(path: Path, signature: dict) -> bool:
    """The stage output at `path` exists and was made with these settings."""
    if not path.exists():
        return False
    saved = json.loads(path.read_text()).get("signature")
    # JSON turns tuples into lists; compare through JSON
    return json.loads(json.dumps(saved)) == json.loads(json.dumps(signature))


def stage_group(cfg: P2RecConfig, ds, out: Path) -> np.ndarray:
    path = out / "groups.json"
    sig = _signature(cfg, *GROUP_KEYS)
    if _fresh(path, sig):
        return np.asarray(json.loads(path.read_text())["groups"], dtype=np.int64)
    retriever, spec = load_retriever(runs_root() / cfg.dataset / "retrieval" / cfg.retriever)
    if spec["num_items"] != ds.num_items:
        raise ValueError(f"retriever {cfg.retriever} has {spec['num_items']} items, dataset {ds.num_items}")
    groups = kmeans_groups(item_embeddings(retriever), cfg.k, cfg.seed)
    sizes = np.bincount(groups[1:], minlength=cfg.k)
    atomic_write_json(path, {"signature": sig, "groups": groups.tolist(),
                       "group_sizes": sizes.tolist()})
    log.info("pre-grouping: %d items into %d groups (sizes %d..%d)", ds.num_items, cfg.k,
             sizes.min(), sizes.max())
    return groups


def build_lm(cfg: P2RecConfig, ds, device) -> P2RecLM:
    """Backbone + LoRA + projection + head, over the grouping retriever's item embeddings."""
    from transformers import AutoTokenizer   # on first use: ~2 s to import, and --help never needs it

    lm = cfg.llm
    if lm.tiny_backbone:
        tok = AutoTokenizer.from_pretrained(resolve_backbone(lm.backbone), local_files_only=True)
        tok.pad_token = tok.pad_token or tok.eos_token
        llm = _tiny_llama(tok)
    else:
        llm, tok = load_backbone(lm.backbone, device="cpu")
    retriever, _ = load_retriever(runs_root() / cfg.dataset / "retrieval" / cfg.retriever)
    llm = add_lora(llm, lm.lora_r, lm.lora_alpha, lm.lora_dropout)
    torch.manual_seed(cfg.seed)
    return P2RecLM(llm, tok, item_embeddings(retriever), cfg.k, cfg.max_items).to(device)


def stage_sft(cfg: P2RecConfig, ds, groups: np.ndarray, out: Path, device) -> P2RecLM:
    sft_dir = out / "sft"
    sig = _signature(cfg, *SFT_KEYS)
    model = build_lm(cfg, ds, device)
    if _fresh(sft_dir / "sft.json", sig):
        # strict=False: the file holds only the trained tensors; any name it has must fit
        res = model.load_state_dict(load_file(sft_dir / "trainable.safetensors"), strict=False)
        if res.unexpected_keys:
            raise ValueError(f"{sft_dir}: weights do not fit this model: {res.unexpected_keys[:3]}")
        return model
    if (sft_dir / "checkpoint").exists() and not _fresh(sft_dir / "signature.json", sig):
        shutil.rmtree(sft_dir / "checkpoint")                   # another setting's checkpoint
    atomic_write_json(sft_dir / "signature.json", {"signature": sig})
    _, hist, targets = user_targets(ds, groups, cfg.k)
    total = len(hist)
    if cfg.sft_users and cfg.sft_users < total:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(total, cfg.sft_users, replace=False))
        hist, targets = [hist[i] for i in keep], targets[keep]
        log.info("SFT on %d of %d users (--sft-users)", len(hist), total)
    inst_hist, inst_targets = instance_examples(hist, groups, cfg.k)
    # the cost comparison runs on the untrained model: step time does not depend on the weights
    timing = {"user": time_steps(model, hist, targets, cfg.sft_batch_size, cfg.timing_examples, cfg.seed),
              "instance": time_steps(model, inst_hist, inst_targets, cfg.sft_batch_size,
                                     cfg.timing_examples, cfg.seed)}
    mse_before = mean_loss(model, hist, targets)
    state = train_sft(model, hist, targets, epochs=cfg.sft_epochs, lr=cfg.sft_lr,
                      batch_size=cfg.sft_batch_size, seed=cfg.seed, out=sft_dir)
    mse_after = mean_loss(model, hist, targets)
    timed = [h["seconds"] for h in state["history"] if h["seconds"] is not None]
    # the MSE of always answering the average user's vector: what SFT must beat to have learnt
    # anything user-specific
    mean_vec = ((targets - targets.mean(0)) ** 2).sum(1).mean()
    weights = {k: v.contiguous() for k, v in model.trainable_state().items()}
    atomic_write(sft_dir / "trainable.safetensors", lambda p: save_file(weights, str(p)))
    m, t = len(hist), len(inst_hist)
    cost = {"user_level_examples": m, "instance_level_examples": t,
            "user_s_per_example": timing["user"]["seconds_per_example"],
            "instance_s_per_example": timing["instance"]["seconds_per_example"],
            "user_epoch_s_est": m * timing["user"]["seconds_per_example"],
            "instance_epoch_s_est": t * timing["instance"]["seconds_per_example"],
            "user_epoch_s_measured": float(np.mean(timed)) if timed else None,
            "examples_timed": cfg.timing_examples}
    report = {"signature": sig, "users": m, "sft_users_of": total,
              "history": state["history"],
              "mse_untrained": mse_before, "mse_trained": mse_after,
              "mse_mean_vector_baseline": float(mean_vec), "cost": cost,
              "trainable_parameters": int(sum(v.numel() for v in weights.values()))}
    atomic_write_json(sft_dir / "sft.json", report)
    log.info("SFT: MSE %.4f → %.4f (mean-vector baseline %.4f); %d user vs %d instance examples, "
             "LLM epoch ≈ %.0f s vs %.0f s", mse_before, mse_after, mean_vec, m, t,
             cost["user_epoch_s_est"], cost["instance_epoch_s_est"])
    return model


def stage_augment(cfg, ds, groups, model, out: Path) -> tuple[torch.Tensor, dict]:
    path = out / "enhanced.safetensors"
    sig = _signature(cfg, *SFT_KEYS)
    if _fresh(out / "agreement.json", sig) and path.exists():
        return load_file(path)["embeddings"], json.loads((out / "agreement.json").read_text())
    t0 = time.perf_counter()
    emb, probs = enhance_items(model, ds.num_items, batch_size=64)
    secs = time.perf_counter() - t0
    atomic_write(path, lambda p: save_file({"embeddings": emb.contiguous(),
                                            "group_probs": probs.contiguous()}, str(p)))
    agree = {"signature": sig, **agreement(groups, probs.numpy()), "inference_s": secs}
    atomic_write_json(out / "agreement.json", agree)
    log.info("augmentation: %d items in %.1f s; C1 %.3f C2 %.3f C3 %.3f", agree["items"], secs,
             agree["C1"], agree["C2"], agree["C3"])
    return emb, agree


def retriever_table(cfg: P2RecConfig) -> torch.Tensor:
    retriever, _ = load_retriever(runs_root() / cfg.dataset / "retrieval" / cfg.retriever)
    return item_embeddings(retriever)


def retrieval_config(cfg: P2RecConfig, model: str, seed: int) -> RetrievalConfig:
    # the fusion loop (ulmrec/p2rec/fusion.py) keeps P2Rec's recipe: raw weights, <= 10 epochs
    return RetrievalConfig(dataset=cfg.dataset, model=model, hidden=cfg.hidden, dropout=cfg.dropout,
                           attn_dropout=cfg.dropout, max_epochs=cfg.max_epochs,
                           patience=cfg.patience, seed=seed, threads=cfg.threads, ema_epochs=0.0)


def stage_fusion(cfg, ds, groups, enhanced, out: Path, device) -> dict:
    """{(model, variant, seed): metrics report}, training only what is not on disk yet."""
    reports = {}
    for model, variant, seed in ((m, v, s) for m in cfg.models for v in cfg.variants
                                 for s in cfg.fusion_seeds):
        rcfg = retrieval_config(cfg, model, seed)
        folder = out / "fusion" / f"{model}-{variant}-s{seed}"
        sig = {**dataclasses.asdict(rcfg), **(_signature(cfg, *SFT_KEYS) if variant == "p2rec"
                                              else _signature(cfg, *GROUP_KEYS) if variant in ("ci", "emb")
                                              else {})}
        if _fresh(folder / "signature.json", sig) and (folder / "metrics.json").exists():
            reports[(model, variant, seed)] = json.loads((folder / "metrics.json").read_text())
            continue
        t0 = time.perf_counter()
        extras = {"groups": groups, "k": cfg.k} if variant == "ci" else \
                 {"enhanced": enhanced} if variant == "p2rec" else \
                 {"enhanced": retriever_table(cfg)} if variant == "emb" else {}
        rep = train_variant(ds, rcfg, variant, folder, device, **extras)
        atomic_write_json(folder / "signature.json", {"signature": sig})
        log.info("%s %s: test N@10 %.4f R@20 %.4f (%.0f s)", model, variant,
                 rep["test"]["NDCG@10"], rep["test"]["Recall@20"], time.perf_counter() - t0)
        reports[(model, variant, seed)] = rep
    if cfg.export_retriever:
        for model in cfg.models:
            # decided on validation, not test: choosing a retriever is model selection
            r20 = {v: np.mean([reports[(model, v, s)]["val"]["candidates_Recall@20"]
                               for s in cfg.fusion_seeds]) for v in ("base", "p2rec")
                   if (model, v, cfg.fusion_seeds[0]) in reports}
            if len(r20) == 2 and r20["p2rec"] > r20["base"]:
                export_retriever(cfg, model, out / "fusion" / f"{model}-p2rec-s{cfg.fusion_seeds[0]}")
            elif len(r20) == 2:
                log.info("%s +P2Rec not exported: validation candidate Recall@20 %.4f does not beat "
                         "Base %.4f (the ranker keeps --retriever %s)", model, r20["p2rec"],
                         r20["base"], model)
    return reports


def export_retriever(cfg: P2RecConfig, model: str, folder: Path) -> None:
    """Copy candidates + metrics where the ranker looks for a retriever (its --retriever name)."""
    target = runs_root() / cfg.dataset / "retrieval" / f"{model}-p2rec"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("candidates.parquet", "metrics.json"):
        atomic_write(target / name, lambda p, n=name: shutil.copyfile(folder / n, p))
    log.info("exported %s as retriever '%s-p2rec' (use --retriever %s-p2rec)", folder, model, model)


def table(reports: dict) -> str:
    """Markdown: test metrics per model and variant, mean (± std when several seeds)."""
    cols = ("Recall@5", "Recall@10", "NDCG@5", "NDCG@10", "candidates_Recall@20")
    names = {"base": "Base", "ci": "+CI", "p2rec": "+P2Rec", "emb": "+Emb (control)"}
    rows = []
    keys = dict.fromkeys((m, v) for m, v, _ in reports)
    for model, variant in keys:
        reps = [r for (m, v, _), r in reports.items() if (m, v) == (model, variant)]
        cells = []
        for c in cols:
            x = np.array([r["test"][c] for r in reps])
            cells.append(f"{x.mean():.4f}" + (f" ± {x.std(ddof=1):.4f}" if len(x) > 1 else ""))
        epochs = ",".join(str(r["best_epoch"]) for r in reps)
        rows.append([model, names[variant], *cells, epochs])
    return markdown_table(["model", "variant", "HR@5", "HR@10", "NDCG@5", "NDCG@10",
                           "Recall@20 (candidates)", "best epochs"], rows, "llrrrrrl")


class UnknownStage(ValueError):
    """--stages names a stage P2Rec does not have."""


def run(cfg: P2RecConfig) -> dict:
    """The stages of `cfg` in order (each skipped when its output exists with the same
    settings); the fusion reports {(model, variant, seed): report}, and with the report stage
    summary.json and table.md written. UnknownStage, DataError, ValueError or
    FileNotFoundError when it cannot run."""
    unknown = set(cfg.stages) - set(STAGES)
    if unknown:
        raise UnknownStage(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset)
    groups = stage_group(cfg, ds, out)
    enhanced, agree, model = None, None, None
    if {"sft", "augment"} & set(cfg.stages) or "p2rec" in cfg.variants and "fusion" in cfg.stages:
        model = stage_sft(cfg, ds, groups, out, device)
        enhanced, agree = stage_augment(cfg, ds, groups, model, out)
        del model
    reports = stage_fusion(cfg, ds, groups, enhanced, out, device) if "fusion" in cfg.stages else {}
    if "report" in cfg.stages and reports:
        md = table(reports)
        summary = {"config": flat_dict(cfg), "agreement": agree,
                   "sft": json.loads((out / "sft" / "sft.json").read_text())
                   if (out / "sft" / "sft.json").exists() else None,
                   "test": {f"{m}-{v}-s{sd}": r["test"] for (m, v, sd), r in reports.items()}}
        atomic_write_json(out / "summary.json", summary)
        atomic_write(out / "table.md", lambda p: p.write_text(md + "\n"))
        log.info("P2Rec test table:\n%s", md)
    return reports
