"""The ranker's training stage: its data, its model and its losses, trained by ulmrec.trainer.fit
(LoRA, or QLoRA on CUDA). The command line is train/finetune.py.

Validation every `eval_every` optimizer steps: verbalizer NDCG@10 on a fixed sample of
validation users whose target was retrieved; the best adapter is kept in <out>/best.
An interrupted run resumes from <out>/checkpoint (adapter, optimizer, scheduler, step);
`--init-from <run>/best` starts a new run from another run's weights instead (a staged or
longer schedule), with a fresh optimizer and schedule.

The loop is ulmrec.trainer.fit (several processes, mixed precision, checkpoints, time boxes).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from accelerate.utils import set_seed
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .backbone import save_tokenizer
from .data import load_dataset
from .fusion import fit_residual_weight, ranked_scores
from .metrics import metrics_from_ranks, target_ranks
from .item_tokens import ItemTokens
from .line_head import LineHead
from .model import encode, response_loss, score_examples
from .paths import atomic_dir, atomic_write_json, display_path, runs_root
from .ranker import RankerConfig, build_ranker, load_candidates, load_task_inputs
from .tasks import TaskConfig, eval_examples, task_counts, training_examples
from .trainer import TrainingArguments, fit, make_accelerator
from .verbalizer import letter_token_ids

log = logging.getLogger("ulmrec.finetune")


@dataclass
class FinetuneConfig(RankerConfig, TaskConfig, TrainingArguments):
    """Six-task alignment tuning of the ranker LLM."""
    run_name: str = field(default="ulmrec", metadata={"help": "folder name under runs/<dataset>/finetune"})
    output_dir: str | None = field(default=None, metadata={"help": "overrides the run folder"})
    loss: str = field(default="token", metadata={
        "help": "token = full-vocabulary cross-entropy on every response token; letters = a "
                "letter answer scored against the 20 candidate letters only (listwise)",
        "choices": ("token", "letters")})
    loss_weighting: str = field(default="token", metadata={
        "help": "token = the batch's mean over all response tokens (long texts dominate); "
                "example = each response's mean, averaged over the batch (a 2-token letter "
                "answer weighs as much as a 40-token preference)",
        "choices": ("token", "example")})
    max_train_examples: int = field(default=0, metadata={"help": "cap on training examples (0 = all)"})
    eval_users: int = field(default=200, metadata={"help": "validation users sampled (0 = all)"})
    eval_batch_size: int = 8
    line_head_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the line scorer's vector (--scorer lines); unset = "
                "--learning-rate. The vector starts at zero and every gradient the LoRA gets "
                "passes through it, so at a LoRA's rate it hardly leaves zero"})
    item_tokens_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the soft item tokens' projection (--item-tokens); unset = "
                "--learning-rate. With --learning-rate 0 only the projection (and a line head "
                "at its own rate) trains: CoLLM's projector stage, the LoRA frozen"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from another run's trained weights (its best/ or last/ adapter, or its "
                "checkpoint/), with a fresh optimizer and schedule: a warm start for a longer or "
                "staged run (ignored once this run has its own checkpoint to resume)"})


class InitFromError(ValueError):
    """--init-from names weights that cannot start this run (the message says why)."""


# what must match for another run's LoRA and index-token rows to mean the same thing here
SAME_FOR_INIT = ("dataset", "backbone", "index_kind", "index_tokens", "lora_r", "lora_targets")


def init_weights(model, folder: Path, cfg: FinetuneConfig) -> None:
    """Load another run's trainable weights (LoRA + index-token rows) into `model` in place."""
    from peft import set_peft_model_state_dict   # on first use: importing peft costs ~10 s

    files = [folder / "adapter_model.safetensors", folder / "trainable.safetensors"]
    weights = next((f for f in files if f.exists()), None)
    if weights is None:
        raise InitFromError(f"--init-from {folder}: no adapter_model.safetensors or "
                         "trainable.safetensors there (give a run's best/, last/ or checkpoint/)")
    saved = folder / "ulmrec_config.json"
    if saved.exists():
        theirs = json.loads(saved.read_text())
        def norm(v):  # JSON gives lists where the config holds tuples
            return list(v) if isinstance(v, (list, tuple)) else v
        diff = [f"{k}: {theirs[k]!r} there, {getattr(cfg, k)!r} here" for k in SAME_FOR_INIT
                if k in theirs and norm(theirs[k]) != norm(getattr(cfg, k))]
        if diff:
            raise InitFromError(f"--init-from {folder} was trained with other settings: " + "; ".join(diff))
    result = set_peft_model_state_dict(model, load_file(weights))
    # (missing keys say nothing here: the output head's index rows are tied to the embedding's)
    unused = getattr(result, "unexpected_keys", [])
    if unused:
        raise InitFromError(f"--init-from {folder}: {len(unused)} saved tensors fit nothing here, e.g. {unused[0]}")
    # soft item tokens: a hybrid run goes on with its projection; from a text-only adapter
    # (LLaRA's curriculum: text first, then hybrid) the projection starts fresh
    saved_tokens = ItemTokens.load(folder)
    if saved_tokens is not None and getattr(model, "item_tokens", None) is not None:
        model.item_tokens.proj.load_state_dict(saved_tokens.proj.state_dict())
    saved_head = LineHead.load(folder)
    if saved_head is not None and getattr(model, "line_head", None) is not None:
        model.line_head.load_state_dict(saved_head.state_dict())


def saved_config(cfg: FinetuneConfig) -> dict:
    """The config as written beside the weights: folders relative to the repository."""
    d = asdict(cfg)
    for k in ("output_dir", "init_from"):
        if d[k]:
            d[k] = display_path(d[k])
    return d


def run_dir(cfg: FinetuneConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return runs_root() / Path(cfg.dataset).name / "finetune" / cfg.run_name


def resolve_residual(cfg: FinetuneConfig, examples, val: pd.DataFrame) -> FinetuneConfig:
    """The config with the residual weight set: as given, or fitted on the validation lists
    that hold their target. Not on the training lists: the retriever was trained on those
    targets, and its scores there are sharper than on held-out items."""
    if cfg.loss != "letters":
        raise ValueError("--residual trains the letter logits plus the retriever's: it needs --loss letters")
    hard = [ex for ex in examples if ex.prior is not None and ex.target is not None]
    if not hard:
        raise ValueError("--residual needs retriever scores on training lists "
                         "(--train-candidates retriever or retriever-only)")
    if cfg.residual_weight is None:
        k = cfg.num_candidates
        lists = [([int(c) for c in cs][:k], [float(x) for x in sc][:k], int(t))
                 for cs, sc, t in zip(val["candidates"], val["scores"], val["target"])]
        held = [(sc, cs.index(t)) for cs, sc, t in lists if t in cs]
        fit = fit_residual_weight([sc for sc, _ in held], [p for _, p in held])
        log.info("residual weight %.3f fitted on %d validation lists that hold their target "
                 "(mean log-likelihood %.4f)", fit["weight"], fit["lists"], fit["log_likelihood"])
        cfg = replace(cfg, residual_weight=fit["weight"])
    log.info("residual over the retriever: letter logits + %.3f · log-softmax(retriever scores) "
             "on %d of %d training prompts", cfg.residual_weight, len(hard), len(examples))
    return cfg


def validate(model, tok, examples, cfg) -> dict:
    """Verbalizer metrics on the validation sample (Rank view: targets are all retrieved)."""
    if not examples:
        return {"NDCG@10": 0.0}
    scores, probs = score_examples(model, tok, examples, cfg.prompt_format, cfg.max_len,
                                   cfg.eval_batch_size, cfg.num_candidates, progress=False)
    prior = [ex.prior for ex in examples] if cfg.residual else None
    ranked = ranked_scores(scores.numpy(), probs.numpy(), prior,
                           cfg.residual_weight if cfg.residual else None)
    pos = [ex.candidates.index(ex.target) for ex in examples]
    return metrics_from_ranks(target_ranks(ranked, pos), ks=(5, 10))


def retriever_order_ndcg(examples) -> float:
    """NDCG@10 of the candidate lists as given (letter A first: the retriever's order)."""
    if not examples:
        return 0.0
    pos = [ex.candidates.index(ex.target) for ex in examples]
    return metrics_from_ranks(np.asarray(pos) + 1, ks=(10,))["NDCG@10"]


def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) the fine-tuning; the run summary, the same on every process."""
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    acc = make_accelerator(cfg.grad_accum)
    set_seed(cfg.seed)
    t_start = time.time()

    ds = load_dataset(cfg.data_config())
    inp, notes = load_task_inputs(ds, cfg)
    cands = load_candidates(ds, cfg, "val")
    val_examples, _ = eval_examples(ds, inp, cands, "val", cfg)
    if cfg.eval_users and len(val_examples) > cfg.eval_users:
        val_examples = random.Random(cfg.seed).sample(val_examples, cfg.eval_users)
    if cfg.train_candidates == "validation":
        if not cfg.eval_users:
            raise ValueError("--train-candidates validation trains on the validation lists: give "
                             "--eval-users N, the sample that stays out to pick the best step")
        # the users that pick the best step never train
        inp.holdout = frozenset(ex.user for ex in val_examples)
    examples = training_examples(inp, cfg)
    cap = cfg.max_train_examples
    if cfg.max_steps:  # no need to tokenize examples the run will never reach
        # a run cut from a longer schedule keeps that run's examples (and so its data order)
        need = (max(cfg.max_steps, cfg.schedule_steps) * cfg.batch_size * cfg.grad_accum
                * int(os.environ.get("WORLD_SIZE", "1")))
        cap = min(cap, need) if cap else need
    if cap:
        examples = examples[:cap]
    counts = task_counts(examples)
    log.info("training examples per task: %s", counts)
    if cfg.scorer == "lines" and cfg.loss != "letters":
        raise ValueError("--scorer lines scores candidate answers listwise: it needs --loss letters")
    if cfg.line_head_lr is not None and cfg.scorer != "lines":
        raise ValueError("--line-head-lr sets the line scorer's rate: it needs --scorer lines")
    if cfg.item_tokens_lr is not None and not cfg.item_tokens:
        raise ValueError("--item-tokens-lr sets the soft item tokens' projection rate: it needs --item-tokens")
    if cfg.scorer == "lines" and acc.num_processes > 1:
        raise ValueError("--scorer lines runs its decoder outside the DDP wrapper: one process only")
    if cfg.residual:
        cfg = resolve_residual(cfg, examples, cands)
    for note in notes:
        log.info("note: %s", note)

    soft = runs_root() / ds.name / "retrieval" / cfg.retriever if cfg.item_tokens else None
    if soft is not None and not (soft / "model.safetensors").exists():
        raise FileNotFoundError(f"--item-tokens reads the retriever's item embedding: {soft} has "
                                f"none (run `python -m train.retrieve --dataset {ds.name} "
                                f"--model {cfg.retriever}`)")
    model, tok = build_ranker(cfg, ds, inp, item_tokens_from=soft)
    item_tokens = getattr(model, "item_tokens", None)
    letter_ids = letter_token_ids(tok, cfg.num_candidates, cfg.prompt_format) if cfg.loss == "letters" else None
    encoded = [encode(tok, ex, cfg.prompt_format, cfg.max_len, lines=cfg.scorer == "lines")
               for ex in tqdm(examples, desc="tokenize", disable=not acc.is_main_process)]
    n_trunc = sum(e["truncated"] for e in encoded)
    if n_trunc:
        log.warning("%d of %d training prompts exceeded max_len=%d and kept their end",
                    n_trunc, len(encoded), cfg.max_len)
    n_tokens = sum(len(e["input_ids"]) for e in encoded)

    # the bar each validation score has to clear: the lists' own (retriever) order, same users
    val_retriever = retriever_order_ndcg(val_examples)
    log.info("validation: %d users; the retriever's own order scores NDCG@10 %.4f on them",
             len(val_examples), val_retriever)

    def evaluate(model) -> dict:
        m = validate(model, tok, val_examples, cfg)
        log.info("val NDCG@10 %.4f (%d users)", m["NDCG@10"], len(val_examples))
        return {**m, "score": m["NDCG@10"]}

    def save(model, name: str):
        def write(tmp: Path):
            # The index-token rows travel as PEFT trainable-token deltas; without this flag
            # PEFT also copies the whole resized embedding (hundreds of MB for a 135M model).
            model.save_pretrained(tmp, save_embedding_layers=False)
            # a reference to the base + added tokens; soft item tokens come back from their file
            save_tokenizer(tok, tmp, cfg.backbone,
                           upto=item_tokens.first_id if item_tokens is not None else None)
            if item_tokens is not None:
                item_tokens.save(tmp)
            if getattr(model, "line_head", None) is not None:
                model.line_head.save(tmp)
            (tmp / "ulmrec_config.json").write_text(json.dumps(saved_config(cfg), indent=1, default=str))
        atomic_dir(out / name, write)

    def init(model):
        init_weights(model, Path(cfg.init_from), cfg)
        log.info("warm start from %s", cfg.init_from)

    own_rates = [(m, lr) for m, lr in ((getattr(model, "line_head", None), cfg.line_head_lr),
                                       (getattr(item_tokens, "proj", None), cfg.item_tokens_lr))
                 if lr is not None]

    def param_groups(model) -> list[dict]:
        groups = [{"params": list(m.parameters()), "lr": lr} for m, lr in own_rates]
        taken = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        return [{"params": rest}] + groups

    loss_fn = partial(response_loss, letter_ids=letter_ids,
                      per_example=cfg.loss_weighting == "example",
                      residual_weight=cfg.residual_weight if cfg.residual else 0.0)
    fitted = fit(model, encoded, cfg, out, loss_fn=loss_fn, pad_id=tok.pad_token_id, seed=cfg.seed,
                 evaluate=evaluate, save=save, init=init if cfg.init_from else None,
                 param_groups=param_groups if own_rates else None,
                 accelerator=acc, desc="finetune")
    run = {"run": cfg.run_name, "steps": fitted["steps"], "best_val_ndcg10": fitted["best"],
           "history": fitted["history"]}
    if fitted.get("already_done"):
        return {**run, "already_done": True}
    if fitted.get("interrupted"):
        return {**run, "lr": fitted["lr"], "interrupted": True,
                "scheduler_steps": fitted["scheduler_steps"]}
    summary = {
        **run, "val_retriever_ndcg10": val_retriever, "dataset": ds.name, "examples": counts, "train_tokens": n_tokens,
        "truncated_prompts": n_trunc, "notes": notes, "processes": fitted["processes"],
        "mixed_precision": fitted["mixed_precision"], "early_stop": fitted["early_stop"],
        "lr": fitted["lr"], "scheduler_steps": fitted["scheduler_steps"],
        "train_seconds_this_process": fitted["train_seconds_this_process"],
        "train_tokens_per_s": fitted["train_tokens_per_s"],
        "total_seconds": time.time() - t_start, "config": saved_config(cfg),
    }
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
        log.info("done: %d steps, best val NDCG@10 %.4f → %s", fitted["steps"], fitted["best"], out / "best")
    acc.wait_for_everyone()
    return summary
