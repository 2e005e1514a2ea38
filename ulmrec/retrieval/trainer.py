"""Train a retriever with early stopping and resumable checkpoints, then export its candidates.

Outputs under runs/<dataset>/retrieval/<model>[-<tag>]/:
  model.safetensors + model.json  best weights (by validation `best_metric`) and how to rebuild them
                                  (the moving average of the weights unless --ema-epochs 0)
  last.pt                         model, optimiser, epoch, RNG, early-stopping state (resume point;
                                  loaded with weights_only=True)
  metrics.json                    val/test full-ranking metrics of the best model, candidate recall,
                                  per-epoch history with wall times
  candidates.parquet              user, split, target, candidates (top-k item ids), scores,
                                  target_in_candidates — one row per user and split
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ulmrec.data import load_dataset

from .blocks import no_decay
from .data import batch_order, collate, eval_histories, later_items, train_windows
from .evaluate import candidate_frame, full_rank, summarize
from .lru import LRURec
from .sasrec import SASRec
from ..paths import atomic_write, runs_root

log = logging.getLogger(__name__)

MODELS = {"lrurec": LRURec, "sasrec": SASRec}
LOSS = "per-target"        # checkpoints of the older per-batch-mean loss must not be resumed
# settings added later, with the value that checkpoints written before them implicitly used
LEGACY = {"ema_epochs": 0.0}
# settings that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"max_epochs", "patience", "device", "threads", "resume", "out_dir",
                     "eval_batch_size", "num_candidates", "tag"}


@dataclass
class RetrievalConfig:
    """Train an LRURec or SASRec retriever; export top-k candidates for validation and test."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name (ulmrec.data)"})
    model: str = field(default="lrurec", metadata={"help": "retriever", "choices": list(MODELS)})
    hidden: int = field(default=64, metadata={"help": "embedding / hidden size"})
    blocks: int = field(default=2, metadata={"help": "LRU or attention blocks"})
    heads: int = field(default=2, metadata={"help": "attention heads (sasrec)"})
    dropout: float = field(default=0.5, metadata={"help": "embedding / FFN dropout (the paper's 0.5)"})
    attn_dropout: float = field(default=0.5, metadata={"help": "dropout on the LRU / attention output"})
    r_min: float = field(default=0.8, metadata={"help": "LRU ring init: smallest |lambda|"})
    r_max: float = field(default=0.99, metadata={"help": "LRU ring init: largest |lambda|"})
    max_len: int = field(default=50, metadata={"help": "longest history the model reads"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=64, metadata={"help": "training windows per batch"})
    pool_batches: int = field(default=32, metadata={
        "help": "batches whose windows are sorted by length together (1 = plain random batches)"})
    max_grad_norm: float = field(default=5.0, metadata={"help": "gradient clipping norm"})
    ema_epochs: float = field(default=4.0, metadata={
        "help": "keep an exponential moving average of the weights over about this many epochs "
                "(per-step decay 1 - 1/(epochs x batches per epoch)); the average is what is "
                "validated, selected and saved (0 = the raw weights)"})
    max_epochs: int = field(default=50, metadata={"help": "upper bound on training epochs"})
    patience: int = field(default=10, metadata={"help": "epochs without validation gain before stopping"})
    best_metric: str = field(default="Recall@20", metadata={
        "help": "validation metric for model selection (Recall@20 = the ranker's ceiling)"})
    num_candidates: int = field(default=20, metadata={"help": "candidates exported per user"})
    eval_batch_size: int = field(default=128, metadata={"help": "users per evaluation batch"})
    seed: int = field(default=42, metadata={"help": "seed for init, dropout and batch order"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default)"})
    tag: str = field(default="", metadata={"help": "suffix of the output folder for variants"})
    out_dir: str | None = field(default=None, metadata={"help": "output folder (overrides the default)"})
    resume: bool = field(default=True, metadata={"help": "continue from last.pt when present"})



def run_dir(cfg: RetrievalConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    return runs_root() / cfg.dataset / "retrieval" / (cfg.model + (f"-{cfg.tag}" if cfg.tag else ""))


def build_model(cfg: RetrievalConfig, num_items: int) -> torch.nn.Module:
    if cfg.model not in MODELS:
        raise ValueError(f"unknown retriever {cfg.model!r}; choose one of {', '.join(MODELS)}")
    return MODELS[cfg.model](num_items, **model_kwargs(cfg))


def model_kwargs(cfg: RetrievalConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("hidden", "blocks", "heads", "dropout", "attn_dropout",
                                         "r_min", "r_max", "max_len")}


def load_retriever(folder: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the best model of a finished run: (model in eval mode, its model.json)."""
    folder = Path(folder)
    spec = json.loads((folder / "model.json").read_text())
    model = MODELS[spec["model"]](spec["num_items"], **spec["kwargs"])
    model.load_state_dict(load_file(folder / "model.safetensors", device=str(device)))
    return model.to(device).eval(), spec


def make_optimizer(model: torch.nn.Module, cfg: RetrievalConfig) -> torch.optim.Optimizer:
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, eps=1e-9)


def _signature(cfg: RetrievalConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def targets_per_batch(windows: list[list[int]], batch_size: int) -> float:
    """Mean number of next-item targets in a batch of an epoch: the loss normaliser.

    A per-batch mean would give a batch of short windows (2-3 targets, common after
    length-sorted pooling) as much weight as a batch of 50-target windows, so a short window's
    targets would count ~3x and a long one's ~0.3x. Dividing each batch's summed loss by this
    epoch-wide constant weights every target alike whatever the batching, as random batches do.
    """
    return sum(len(w) - 1 for w in windows) / max(math.ceil(len(windows) / batch_size), 1)


def batch_loss(model, windows, idx: list[int], norm: float, device) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the batch's real targets / norm, number of targets)."""
    inputs, targets = collate(windows, idx)
    inputs, targets = inputs.to(device), targets.to(device)                        # [B, L]
    # a window's first item is never a target (nothing precedes it), however much left
    # padding its batch adds: otherwise short windows beside long ones would gain a target
    keep = (targets > 0) & (inputs > 0)
    hidden = model.encode(inputs)[keep]                                             # [T, d]
    # only real positions are scored: the [T, N+1] logits are the bulk of the cost
    ce = F.cross_entropy(model.score(hidden), targets[keep], reduction="sum")
    return ce / norm, int(keep.sum())


def make_average(model: torch.nn.Module, cfg: RetrievalConfig, batches: int) -> AveragedModel | None:
    """The moving average of the weights that is validated and kept, or None (ema_epochs 0).

    With dropout 0.5 the validation curve is flat for tens of epochs while the weights keep
    wandering around the optimum; averaging them over the last few epochs lands nearer its
    centre. The horizon is counted in epochs, not steps, so that a catalogue of 8 batches per
    epoch averages over the same share of its training as one of 242.
    """
    if cfg.ema_epochs < 0:
        raise ValueError(f"ema_epochs must be 0 (off) or a positive number of epochs, got {cfg.ema_epochs}")
    if cfg.ema_epochs == 0:
        return None
    decay = max(0.0, 1.0 - 1.0 / (cfg.ema_epochs * batches))
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def train_epoch(model, opt, windows, cfg: RetrievalConfig, epoch: int, device,
                average: AveragedModel | None = None) -> float:
    """One pass over the training windows; returns the mean cross-entropy per target."""
    model.train()
    norm = targets_per_batch(windows, cfg.batch_size)
    total, seen = 0.0, 0
    bar = tqdm(batch_order(windows, cfg.batch_size, cfg.seed, epoch, cfg.pool_batches),
               desc=f"{cfg.model} epoch {epoch + 1}", leave=False, mininterval=5)
    for idx in bar:
        loss, n = batch_loss(model, windows, idx, norm, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        if average is not None:
            average.update_parameters(model)
        total += loss.item() * norm
        seen += n
        bar.set_postfix(loss=f"{total / seen:.3f}", refresh=False)
    return total / max(seen, 1)


def _device(cfg: RetrievalConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no CUDA device is available")
    return torch.device(cfg.device)


def run(cfg: RetrievalConfig, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict:
    """Train (or resume) until early stopping or max_epochs, then evaluate the best model on
    val and test and write candidates + metrics. `on_epoch_end(epoch, state)` runs after each
    epoch's checkpoint is on disk (used by tests to simulate an interruption)."""
    if cfg.best_metric not in {f"{m}@{k}" for m in ("Recall", "NDCG", "MRR") for k in (5, 10, 20)}:
        raise ValueError(f"best_metric must be Recall/NDCG/MRR@5/10/20, got {cfg.best_metric!r}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg)
    ds = load_dataset(cfg.dataset)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds.num_items).to(device)
    opt = make_optimizer(model, cfg)
    windows = train_windows(list(ds.sequences("train")), cfg.max_len)
    average = make_average(model, cfg, math.ceil(len(windows) / cfg.batch_size))
    kept = average.module if average is not None else model    # what is validated and saved
    val_users, val_hist, val_targets = eval_histories(ds, "val")
    log.info("%s %s: %d items, %d training windows, %d val users, %d parameters, device %s, "
             "%d threads → %s", cfg.dataset, cfg.model, ds.num_items, len(windows), len(val_users),
             sum(p.numel() for p in model.parameters()), device, torch.get_num_threads(), out)

    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "bad_epochs": 0,
             "stopped_early": False, "history": []}
    last = out / "last.pt"
    if cfg.resume and last.exists():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        # a setting added after the checkpoint was written counts as having the value that
        # reproduces the older behaviour (LEGACY) or else its default
        saved = {**_signature(RetrievalConfig()), **LEGACY, **ckpt["signature"]}
        if saved != _signature(cfg):
            diff = sorted(k for k in _signature(cfg) if saved.get(k) != getattr(cfg, k))
            raise ValueError(f"{last} was written with other settings ({', '.join(diff)}); "
                             f"pass --no-resume to start over or --tag for a separate run")
        if ckpt.get("loss") != LOSS:
            raise ValueError(f"{last} was trained with an older per-batch-mean loss; pass "
                             f"--no-resume to start over or --tag for a separate run")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if average is not None:
            average.load_state_dict(ckpt["average"])
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and "cuda_rng" in ckpt:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        state = ckpt["state"]
        log.info("resumed from %s after epoch %d (best %s %.4f at epoch %d)", last, state["epoch"],
                 cfg.best_metric, state["best"], state["best_epoch"])

    for epoch in range(state["epoch"], cfg.max_epochs):
        if state["stopped_early"]:
            break
        t0 = time.perf_counter()
        loss = train_epoch(model, opt, windows, cfg, epoch, device, average)
        t1 = time.perf_counter()
        val = summarize(full_rank(kept, val_hist, val_targets, cfg.max_len, cfg.eval_batch_size,
                                  cfg.num_candidates, device, desc="val"), val_targets)
        t2 = time.perf_counter()
        score = val[cfg.best_metric]
        if score > state["best"]:
            state.update(best=score, best_epoch=epoch + 1, bad_epochs=0)
            weights = {k: v.detach().cpu().contiguous() for k, v in kept.state_dict().items()}
            atomic_write(out / "model.safetensors", lambda p: save_file(weights, str(p)))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["stopped_early"] = state["bad_epochs"] >= cfg.patience
        state["history"].append({"epoch": epoch + 1, "loss": loss, "train_s": t1 - t0,
                                 "eval_s": t2 - t1, **{f"val_{k}": v for k, v in val.items()
                                                       if k in ("Recall@10", "NDCG@10", "Recall@20")}})
        log.info("epoch %d: loss %.4f, val R@10 %.4f N@10 %.4f R@20 %.4f, train %.1fs, eval %.1fs%s",
                 epoch + 1, loss, val["Recall@10"], val["NDCG@10"], val["Recall@20"], t1 - t0,
                 t2 - t1, " (best)" if state["best_epoch"] == epoch + 1 else "")
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(), "state": state, "signature": _signature(cfg), "loss": LOSS}
        if average is not None:
            ckpt["average"] = average.state_dict()
        if device.type == "cuda":
            ckpt["cuda_rng"] = torch.cuda.get_rng_state(device)
        atomic_write(last, lambda p: torch.save(ckpt, p))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, state)
    if state["stopped_early"]:
        log.info("early stop: no %s gain for %d epochs; best epoch %d", cfg.best_metric,
                 cfg.patience, state["best_epoch"])
    if not (out / "model.safetensors").exists():
        raise RuntimeError(f"{out}: no model.safetensors — max_epochs={cfg.max_epochs} trained nothing")
    spec = {"model": cfg.model, "num_items": ds.num_items, "kwargs": model_kwargs(cfg),
            "dataset": cfg.dataset, "best_epoch": state["best_epoch"]}
    atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(spec, indent=1)))
    return export(cfg, ds, out, state, device)


def rank_splits(model, ds, cfg: RetrievalConfig, device) -> tuple[dict, pd.DataFrame]:
    """Full-ranking metrics per split and the candidate frame of all three splits."""
    frames, metrics = [], {}
    for split in ("train", "val", "test"):
        users, hist, targets = eval_histories(ds, split)
        res = full_rank(model, hist, targets, cfg.max_len, cfg.eval_batch_size, cfg.num_candidates,
                        device, desc=split,
                        exclude=later_items(ds, users) if split == "train" else None)
        metrics[split] = summarize(res, targets)
        frames.append(candidate_frame(users, split, targets, res))
    return metrics, pd.concat(frames, ignore_index=True)


def export(cfg: RetrievalConfig, ds, out: Path, state: dict, device) -> dict:
    """Evaluate the best checkpoint on val and test; write candidates.parquet (train, val and
    test rows) and metrics.json. Train rows are the ranker's hard training candidates; the
    model has seen those targets, so their metrics are reported apart and never as quality."""
    model, _ = load_retriever(out, device)
    metrics, cands = rank_splits(model, ds, cfg, device)
    atomic_write(out / "candidates.parquet", lambda p: cands.to_parquet(p, index=False))
    hist = state["history"]
    report = {
        "dataset": cfg.dataset, "model": cfg.model, "config": dataclasses.asdict(cfg),
        "device": str(device), "threads": torch.get_num_threads(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "val": metrics["val"], "test": metrics["test"], "train_fit": metrics["train"],
        "ranker_ceiling": {f"{s}_Recall@{cfg.num_candidates}":
                           metrics[s][f"candidates_Recall@{cfg.num_candidates}"] for s in ("val", "test")},
        "best_epoch": state["best_epoch"], "epochs_trained": state["epoch"],
        "stopped_early": state["stopped_early"],
        "train_seconds_per_epoch": float(np.mean([h["train_s"] for h in hist])) if hist else None,
        "eval_seconds_per_epoch": float(np.mean([h["eval_s"] for h in hist])) if hist else None,
        "history": hist,
    }
    atomic_write(out / "metrics.json", lambda p: p.write_text(json.dumps(report, indent=1)))
    t = metrics["test"]
    log.info("%s %s test: R@5 %.4f N@5 %.4f R@10 %.4f N@10 %.4f R@20 %.4f N@20 %.4f; "
             "candidate recall@%d val %.4f test %.4f → %s", cfg.dataset, cfg.model, t["Recall@5"],
             t["NDCG@5"], t["Recall@10"], t["NDCG@10"], t["Recall@20"], t["NDCG@20"],
             cfg.num_candidates, metrics["val"][f"candidates_Recall@{cfg.num_candidates}"],
             t[f"candidates_Recall@{cfg.num_candidates}"], out)
    return report
