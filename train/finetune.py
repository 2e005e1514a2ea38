"""Instruction-tune the ranker on the six alignment tasks (LoRA, or QLoRA on CUDA).

    python -m train.finetune --dataset games --config configs/cpu.yaml
    accelerate launch -m train.finetune --config configs/paper.yaml      # multi-GPU

Validation every `eval_every` optimizer steps: verbalizer NDCG@10 on a fixed sample of
validation users whose target was retrieved; the best adapter is kept in <out>/best.
An interrupted run resumes from <out>/checkpoint (adapter, optimizer, scheduler, step);
`--init-from <run>/best` starts a new run from another run's weights instead (a staged or
longer schedule), with a fresh optimizer and schedule.

Several processes (accelerate launch / torchrun): each takes its share of every batch; the
LR scheduler steps once per optimizer step (not once per process); process 0 validates
and broadcasts the score, so every process takes the same keep / stop decision.
Mixed precision on CUDA: bf16 where the GPU supports it, else fp16 (a T4).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ulmrec.backbone import save_tokenizer
from ulmrec.checkpoint import load_checkpoint, read_state, save_checkpoint
from ulmrec.config import parse_config
from ulmrec.data import load_dataset
from ulmrec.metrics import metrics_from_ranks, target_ranks
from ulmrec.model import collate, encode, response_loss, score_examples
from ulmrec.verbalizer import letter_token_ids
from ulmrec.paths import atomic_dir, atomic_write_json, display_path, runs_root
from ulmrec.ranker import RankerConfig, build_ranker, load_candidates, load_task_inputs
from ulmrec.tasks import TaskConfig, eval_examples, task_counts, training_examples

log = logging.getLogger("train.finetune")


# lr_schedule → transformers' scheduler name (each warms up linearly first)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class FinetuneConfig(RankerConfig, TaskConfig):
    """Six-task alignment tuning of the ranker LLM."""
    run_name: str = field(default="ulmrec", metadata={"help": "folder name under runs/<dataset>/finetune"})
    output_dir: str | None = field(default=None, metadata={"help": "overrides the run folder"})
    learning_rate: float = 1e-4
    loss: str = field(default="token", metadata={
        "help": "token = full-vocabulary cross-entropy on every response token; letters = a "
                "letter answer scored against the 20 candidate letters only (listwise)",
        "choices": ("token", "letters")})
    loss_weighting: str = field(default="token", metadata={
        "help": "token = the batch's mean over all response tokens (long texts dominate); "
                "example = each response's mean, averaged over the batch (a 2-token letter "
                "answer weighs as much as a 40-token preference)",
        "choices": ("token", "example")})
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = epochs)"})
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 100
    lr_schedule: str = field(default="linear", metadata={
        "help": "after the warmup: linear = decay to 0 at the last step; cosine = half a cosine "
                "to 0; constant = stay at learning_rate",
        "choices": tuple(SCHEDULES)})
    max_train_examples: int = field(default=0, metadata={"help": "cap on training examples (0 = all)"})
    eval_every: int = field(default=100, metadata={"help": "optimizer steps between validations"})
    eval_users: int = field(default=200, metadata={"help": "validation users sampled (0 = all)"})
    eval_batch_size: int = 8
    patience: int = field(default=20, metadata={"help": "validations without improvement before stopping"})
    stop_after: int = field(default=0, metadata={
        "help": "leave after this many optimizer steps, resumable, as if interrupted (time boxes)"})
    resume: bool = field(default=True, metadata={"help": "continue from <out>/checkpoint if present"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from another run's trained weights (its best/ or last/ adapter, or its "
                "checkpoint/), with a fresh optimizer and schedule: a warm start for a longer or "
                "staged run (ignored once this run has its own checkpoint to resume)"})


# what must match for another run's LoRA and index-token rows to mean the same thing here
SAME_FOR_INIT = ("dataset", "backbone", "index_kind", "index_tokens", "lora_r", "lora_targets")


def init_weights(model, folder: Path, cfg: FinetuneConfig) -> None:
    """Load another run's trainable weights (LoRA + index-token rows) into `model` in place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = [folder / "adapter_model.safetensors", folder / "trainable.safetensors"]
    weights = next((f for f in files if f.exists()), None)
    if weights is None:
        raise SystemExit(f"--init-from {folder}: no adapter_model.safetensors or "
                         "trainable.safetensors there (give a run's best/, last/ or checkpoint/)")
    saved = folder / "ulmrec_config.json"
    if saved.exists():
        theirs = json.loads(saved.read_text())
        def norm(v):  # JSON gives lists where the config holds tuples
            return list(v) if isinstance(v, (list, tuple)) else v
        diff = [f"{k}: {theirs[k]!r} there, {getattr(cfg, k)!r} here" for k in SAME_FOR_INIT
                if k in theirs and norm(theirs[k]) != norm(getattr(cfg, k))]
        if diff:
            raise SystemExit(f"--init-from {folder} was trained with other settings: " + "; ".join(diff))
    result = set_peft_model_state_dict(model, load_file(weights))
    # (missing keys say nothing here: the output head's index rows are tied to the embedding's)
    unused = getattr(result, "unexpected_keys", [])
    if unused:
        raise SystemExit(f"--init-from {folder}: {len(unused)} saved tensors fit nothing here, e.g. {unused[0]}")


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


def validate(model, tok, examples, cfg) -> dict:
    """Verbalizer metrics on the validation sample (Rank view: targets are all retrieved)."""
    if not examples:
        return {"NDCG@10": 0.0}
    scores, _ = score_examples(model, tok, examples, cfg.prompt_format, cfg.max_len,
                               cfg.eval_batch_size, cfg.num_candidates, progress=False)
    pos = [ex.candidates.index(ex.target) for ex in examples]
    return metrics_from_ranks(target_ranks(scores.numpy(), pos), ks=(5, 10))


def mixed_precision() -> str:
    """Accelerate's mixed_precision for this machine: bf16 on CUDA GPUs that have it (Ampere
    and later), fp16 on older ones (a T4, a V100), none on CPU."""
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    train(parse_config(FinetuneConfig, argv))
    return 0


def train(cfg: FinetuneConfig) -> dict:
    """Run (or resume) the fine-tuning; the run summary, the same on every process."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
    from transformers import get_scheduler

    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    # the others wait at the broadcast while process 0 validates: allow a long validation
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed_precision(),
                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])
    set_seed(cfg.seed)
    t_start = time.time()

    ds = load_dataset(cfg.data_config())
    inp, notes = load_task_inputs(ds, cfg)
    examples = training_examples(inp, cfg)
    cap = cfg.max_train_examples
    if cfg.max_steps:  # no need to tokenize examples the run will never reach
        need = cfg.max_steps * cfg.batch_size * cfg.grad_accum * int(os.environ.get("WORLD_SIZE", "1"))
        cap = min(cap, need) if cap else need
    if cap:
        examples = examples[:cap]
    counts = task_counts(examples)
    log.info("training examples per task: %s", counts)
    for note in notes:
        log.info("note: %s", note)

    model, tok = build_ranker(cfg, ds, inp)
    letter_ids = letter_token_ids(tok, cfg.num_candidates, cfg.prompt_format) if cfg.loss == "letters" else None
    encoded = [encode(tok, ex, cfg.prompt_format, cfg.max_len)
               for ex in tqdm(examples, desc="tokenize", disable=not acc.is_main_process)]
    n_trunc = sum(e["truncated"] for e in encoded)
    if n_trunc:
        log.warning("%d of %d training prompts exceeded max_len=%d and kept their end",
                    n_trunc, len(encoded), cfg.max_len)
    n_tokens = sum(len(e["input_ids"]) for e in encoded)

    cands = load_candidates(ds, cfg, "val")
    val_examples, _ = eval_examples(ds, inp, cands, "val", cfg)
    if cfg.eval_users and len(val_examples) > cfg.eval_users:
        val_examples = random.Random(cfg.seed).sample(val_examples, cfg.eval_users)

    micro = cfg.batch_size * acc.num_processes
    # Whole optimizer steps only: a leftover partial accumulation is dropped from the epoch.
    steps_per_epoch = max(1, math.ceil(len(encoded) / micro) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch * cfg.num_epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_scheduler(SCHEDULES[cfg.lr_schedule], optim,
                          num_warmup_steps=min(cfg.warmup_steps, total_steps // 10 or 1),
                          num_training_steps=total_steps)
    # The scheduler stays out of acc.prepare: Accelerate would step it once per process per
    # optimizer step (8 GPUs: the LR reaches 0 after 1/8 of the schedule). It steps below,
    # once per optimizer step, on every process alike.
    model, optim = acc.prepare(model, optim)
    pad = tok.pad_token_id

    state = {"step": 0, "best": -1.0, "bad_evals": 0, "history": [], "done": False}
    ckpt = out / "checkpoint"
    if cfg.resume and read_state(ckpt) is not None:
        state = load_checkpoint(ckpt, acc.unwrap_model(model), optim, sched)
        log.info("resumed from %s at step %d (best NDCG@10 %.4f)", ckpt, state["step"], state["best"])
    elif cfg.init_from:
        init_weights(acc.unwrap_model(model), Path(cfg.init_from), cfg)
        log.info("warm start from %s", cfg.init_from)
    if state["done"]:
        log.info("run already finished; nothing to do (use --no-resume to retrain)")
        return {"run": cfg.run_name, "steps": state["step"], "best_val_ndcg10": state["best"],
                "history": state["history"], "already_done": True}

    def save():
        if acc.is_main_process:
            save_checkpoint(ckpt, acc.unwrap_model(model), optim, sched, state)

    def save_adapter(name: str):
        if acc.is_main_process:
            def write(tmp: Path):
                # The index-token rows travel as PEFT trainable-token deltas; without this flag
                # PEFT also copies the whole resized embedding (hundreds of MB for a 135M model).
                acc.unwrap_model(model).save_pretrained(tmp, save_embedding_layers=False)
                save_tokenizer(tok, tmp, cfg.backbone)  # a reference to the base + added tokens
                (tmp / "ulmrec_config.json").write_text(json.dumps(saved_config(cfg), indent=1, default=str))
            atomic_dir(out / name, write)

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="finetune",
               disable=not acc.is_main_process)
    last_val = float("nan")
    t_train = time.time()
    tokens_seen = 0
    lrs: list[float] = []      # the LR each optimizer step of this session used
    stopped_early = False
    while state["step"] < total_steps:
        # Each epoch's order comes from (seed, epoch), so a resumed run replays it exactly.
        epoch, done_in_epoch = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        batches = batches[done_in_epoch * cfg.grad_accum: steps_per_epoch * cfg.grad_accum]
        for idx in batches:
            mine = idx[acc.process_index::acc.num_processes].tolist() or idx[:1].tolist()
            batch = collate([encoded[i] for i in mine], pad)
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            with acc.accumulate(model):
                loss = response_loss(model, batch, letter_ids, cfg.loss_weighting == "example")
                acc.backward(loss)
                optim.step()           # a no-op until the accumulation is complete
                optim.zero_grad()
            tokens_seen += int(batch["attention_mask"].sum())
            if not acc.sync_gradients:
                continue
            lrs.append(sched.get_last_lr()[0])
            if not acc.optimizer_step_was_skipped:  # fp16: an inf/nan step is skipped
                sched.step()
            state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", val_ndcg10=f"{last_val:.4f}")
            at_end = state["step"] >= total_steps
            if state["step"] % cfg.eval_every == 0 or at_end:
                m = validate(acc.unwrap_model(model), tok, val_examples, cfg) if acc.is_main_process else {}
                # every process takes process 0's score, so all keep / stop alike (a process
                # that stopped alone would leave the others waiting in the next all-reduce)
                box = [m]
                broadcast_object_list(box, from_process=0)
                m = box[0]
                last_val = m.get("NDCG@10", float("nan"))
                state["history"].append({"step": state["step"], "loss": loss.item(), **m})
                log.info("step %d: loss %.4f, val NDCG@10 %.4f (%d users)", state["step"],
                         loss.item(), last_val, len(val_examples))
                if last_val > state["best"]:
                    state["best"], state["bad_evals"] = last_val, 0
                    save_adapter("best")
                else:
                    state["bad_evals"] += 1
                if state["bad_evals"] >= cfg.patience:
                    log.info("early stop: %d validations without improvement", cfg.patience)
                    at_end = stopped_early = True
                state["done"] = at_end
                save()
            if cfg.stop_after and state["step"] >= cfg.stop_after and not at_end:
                save()
                acc.wait_for_everyone()
                log.info("stopping at step %d as asked (--stop-after); rerun to resume", state["step"])
                return {"run": cfg.run_name, "steps": state["step"], "lr": lrs, "interrupted": True,
                        "scheduler_steps": sched.last_epoch, "history": state["history"]}
            if at_end:
                break
        if state["done"] or state["step"] >= total_steps:
            break
    bar.close()
    state["done"] = True
    save()
    save_adapter("last")
    train_s = time.time() - t_train
    summary = {
        "run": cfg.run_name, "dataset": ds.name, "examples": counts, "train_tokens": n_tokens,
        "truncated_prompts": n_trunc, "steps": state["step"], "best_val_ndcg10": state["best"],
        "history": state["history"], "notes": notes, "processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision, "early_stop": stopped_early,
        "lr": lrs, "scheduler_steps": sched.last_epoch, "train_seconds_this_process": train_s,
        "train_tokens_per_s": tokens_seen / train_s if train_s else None,
        "total_seconds": time.time() - t_start, "config": saved_config(cfg),
    }
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
        log.info("done: %d steps, best val NDCG@10 %.4f → %s", state["step"], state["best"], out / "best")
    acc.wait_for_everyone()
    return summary


if __name__ == "__main__":
    sys.exit(main())
