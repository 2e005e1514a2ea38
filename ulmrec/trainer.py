"""The one supervised fine-tuning loop: the ranker, the decoder, LC-Rec and the GPU check all
train through `fit`, so that a new loss or a new way to validate is written once.

    args = TrainingArguments(learning_rate=2e-4, max_steps=600, eval_every=150)
    summary = fit(model, encoded, args, out, loss_fn=response_loss, pad_id=tok.pad_token_id,
                  evaluate=lambda m: {"score": ...}, save=lambda m, name: ...)

What it owns: AdamW + warmup and schedule, the epoch order (from seed + epoch, so a resumed
run replays it), gradient accumulation and several processes through Accelerate, the
checkpoint under <out>/checkpoint (`ulmrec.checkpoint`), validation with best-so-far,
patience and early stop, `stop_after` time boxes, and the run's loop statistics. What it
leaves to the caller: building the model and its data, seeding (before the model is built,
so that its initialisation and the dropout draws stay where they were), what a batch's loss
is (`loss_fn(model, batch)`), what validation scores (`evaluate(model)` → a dict with
"score") and what "best" / "last" mean on disk (`save(model, name)`).

Several processes (accelerate launch / torchrun): each takes its share of every batch; the
LR scheduler steps once per optimizer step (not once per process); process 0 validates and
broadcasts the score, so every process takes the same keep / stop decision.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, read_state, save_checkpoint
from .model import collate

log = logging.getLogger(__name__)

# lr_schedule → transformers' scheduler name (each warms up linearly first)
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainingArguments:
    """How long and how fast to train, how often to validate and to checkpoint."""
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps (0 = epochs)"})
    batch_size: int = 4
    grad_accum: int = 1
    warmup_steps: int = 100
    schedule_steps: int = field(default=0, metadata={
        "help": "the learning-rate schedule's length in optimizer steps (0 = the run's own); a "
                "run cut shorter than its schedule takes the same steps as the first ones of "
                "the longer run"})
    max_grad_norm: float = field(default=0.0, metadata={
        "help": "clip the gradient norm to this before each optimizer step (0 = no clipping)"})
    lr_schedule: str = field(default="linear", metadata={
        "help": "after the warmup: linear = decay to 0 at the last step; cosine = half a cosine "
                "to 0; constant = stay at learning_rate",
        "choices": tuple(SCHEDULES)})
    eval_every: int = field(default=100, metadata={"help": "optimizer steps between validations"})
    patience: int = field(default=20, metadata={"help": "validations without improvement before stopping"})
    stop_after: int = field(default=0, metadata={
        "help": "leave after this many optimizer steps, resumable, as if interrupted (time boxes)"})
    ckpt_every: int = field(default=50, metadata={
        "help": "optimizer steps between checkpoints, so that a killed run loses at most these "
                "(0 = at validations and --stop-after only)"})
    resume: bool = field(default=True, metadata={"help": "continue from <out>/checkpoint if present"})


def mixed_precision() -> str:
    """Accelerate's mixed_precision for this machine: bf16 on CUDA GPUs that have it (Ampere
    and later), fp16 on older ones (a T4, a V100), none on CPU."""
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def make_accelerator(grad_accum: int = 1):
    """The Accelerator `fit` runs under; create it first where the caller needs to know its
    process (e.g. to show progress bars on the main process only)."""
    # the others wait at the broadcast while process 0 validates: allow a long validation
    return Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision(),
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])


def total_steps(n_examples: int, args: TrainingArguments, processes: int = 1) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps). Whole optimizer steps only: a leftover partial
    accumulation is dropped from the epoch."""
    micro = args.batch_size * processes
    per_epoch = max(1, math.ceil(n_examples / micro) // args.grad_accum)
    return per_epoch, args.max_steps or max(1, math.ceil(per_epoch * args.num_epochs))


def fit(model, encoded: list[dict], args: TrainingArguments, out: Path, *,
        loss_fn: Callable, pad_id: int | None = None, collate_fn: Callable | None = None,
        seed: int = 42,
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        save: Callable[[torch.nn.Module, str], None] | None = None,
        init: Callable[[torch.nn.Module], None] | None = None,
        param_groups: Callable[[torch.nn.Module], list[dict]] | None = None,
        accelerator=None, desc: str = "train") -> dict:
    """Train (or resume) `model` on `encoded` (ulmrec.model.encode rows, batched by
    ulmrec.model.collate with `pad_id`; or any rows, batched by `collate_fn(rows)` into a dict
    whose tensors go to the device); the loop summary, the same on every process.

    evaluate: every `eval_every` steps and at the end; a higher "score" is better, a better
    one calls save(model, "best"). save(model, "last") once training ends. init(model): a
    warm start, applied only when there is no checkpoint to resume. A checkpoint is written at
    each validation, every `args.ckpt_every` steps, at --stop-after and at the end.
    param_groups(model): AdamW's parameter groups, for parts that learn at a rate of their own
    (each group's "lr" follows the same warmup and schedule); by default one group, every
    trainable parameter at args.learning_rate."""
    from transformers import get_scheduler   # on first use: ~7 s to import, and --help never needs it

    out = Path(out)
    acc = accelerator or make_accelerator(args.grad_accum)
    micro = args.batch_size * acc.num_processes
    steps_per_epoch, total = total_steps(len(encoded), args, acc.num_processes)
    params = (param_groups(model) if param_groups is not None
              else [p for p in model.parameters() if p.requires_grad])
    optim = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.schedule_steps and args.schedule_steps < total:
        raise ValueError(f"--schedule-steps {args.schedule_steps} is shorter than the run's "
                         f"{total} steps: the learning rate would reach 0 before the end")
    schedule = args.schedule_steps or total
    sched = get_scheduler(SCHEDULES[args.lr_schedule], optim,
                          num_warmup_steps=min(args.warmup_steps, schedule // 10 or 1),
                          num_training_steps=schedule)
    # The scheduler stays out of acc.prepare: Accelerate would step it once per process per
    # optimizer step (8 GPUs: the LR reaches 0 after 1/8 of the schedule). It steps below,
    # once per optimizer step, on every process alike.
    model, optim = acc.prepare(model, optim)
    bare = acc.unwrap_model(model)

    state = {"step": 0, "best": -1.0, "bad_evals": 0, "history": [], "losses": [], "done": False}
    ckpt = out / "checkpoint"
    if args.resume and read_state(ckpt) is not None:
        state.update(load_checkpoint(ckpt, bare, optim, sched))
        log.info("resumed from %s at step %d of %d", ckpt, state["step"], total)
    elif init is not None:
        init(bare)
    base = {"steps": state["step"], "total_steps": total, "best": state["best"],
            "history": state["history"], "processes": acc.num_processes,
            "mixed_precision": acc.mixed_precision}
    if state["done"]:
        log.info("run already finished; nothing to do (use --no-resume to retrain)")
        return {**base, "losses": state["losses"], "already_done": True}

    def checkpoint():
        if acc.is_main_process:
            save_checkpoint(ckpt, bare, optim, sched, state)

    model.train()
    bar = tqdm(total=total, initial=state["step"], desc=desc, unit="step",
               disable=not acc.is_main_process)
    last_val = float("nan")
    t_train = time.time()
    tokens_seen = 0
    lrs: list[float] = []      # the LR each optimizer step of this session used
    stopped_early = interrupted = False
    while state["step"] < total and not (stopped_early or interrupted):
        # Each epoch's order comes from (seed, epoch), so a resumed run replays it exactly.
        epoch, done_in_epoch = divmod(state["step"], steps_per_epoch)
        order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed + epoch))
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        batches = batches[done_in_epoch * args.grad_accum: steps_per_epoch * args.grad_accum]
        for idx in batches:
            mine = idx[acc.process_index::acc.num_processes].tolist() or idx[:1].tolist()
            rows = [encoded[i] for i in mine]
            batch = collate(rows, pad_id) if collate_fn is None else collate_fn(rows)
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with acc.accumulate(model):
                loss = loss_fn(model, batch)
                acc.backward(loss)
                if args.max_grad_norm and acc.sync_gradients:
                    acc.clip_grad_norm_(params, args.max_grad_norm)
                optim.step()           # a no-op until the accumulation is complete
                optim.zero_grad()
            tokens_seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
            if not acc.sync_gradients:
                continue
            lrs.append(sched.get_last_lr()[0])
            if not acc.optimizer_step_was_skipped:  # fp16: an inf/nan step is skipped
                sched.step()
            state["step"] += 1
            state["losses"].append(round(loss.item(), 4))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **({"val": f"{last_val:.4f}"} if evaluate else {}))
            at_end = state["step"] >= total
            validating = evaluate is not None and (state["step"] % args.eval_every == 0 or at_end)
            if validating:
                m = evaluate(bare) if acc.is_main_process else {}
                # every process takes process 0's score, so all keep / stop alike (a process
                # that stopped alone would leave the others waiting in the next all-reduce)
                box = [m]
                broadcast_object_list(box, from_process=0)
                m = box[0]
                last_val = m.get("score", float("nan"))
                state["history"].append({"step": state["step"], "loss": loss.item(),
                                         **{k: v for k, v in m.items() if k != "score"}})
                log.info("step %d: loss %.4f, validation %.4f", state["step"], loss.item(), last_val)
                if last_val > state["best"]:
                    state["best"], state["bad_evals"] = last_val, 0
                    if save is not None and acc.is_main_process:
                        save(bare, "best")
                else:
                    state["bad_evals"] += 1
                if state["bad_evals"] >= args.patience:
                    log.info("early stop: %d validations without improvement", args.patience)
                    at_end = stopped_early = True
            elif state["step"] % 10 == 0 or at_end:
                log.info("step %d/%d loss %.4f (mean of the last 10: %.4f)", state["step"], total,
                         loss.item(), sum(state["losses"][-10:]) / len(state["losses"][-10:]))
            if validating or (args.ckpt_every and state["step"] % args.ckpt_every == 0 and not at_end):
                checkpoint()
            if args.stop_after and state["step"] >= args.stop_after and not at_end:
                checkpoint()
                acc.wait_for_everyone()
                log.info("stopping at step %d as asked (--stop-after); rerun to resume", state["step"])
                interrupted = True
                break
            if at_end:
                break
    bar.close()
    train_s = time.time() - t_train
    summary = {**base, "steps": state["step"], "best": state["best"], "history": state["history"],
               "lr": lrs, "scheduler_steps": sched.last_epoch, "losses": state["losses"],
               "train_seconds_this_process": train_s,
               "train_tokens_per_s": tokens_seen / train_s if train_s else None}
    if interrupted:
        return {**summary, "interrupted": True}
    if save is not None and acc.is_main_process:
        save(bare, "last")
    state["done"] = True
    checkpoint()
    acc.wait_for_everyone()
    return {**summary, "early_stop": stopped_early}
