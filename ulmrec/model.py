"""The ranker LLM: index tokens, LoRA / QLoRA, response-only loss, batched letter scoring."""
from __future__ import annotations

import inspect
import logging
import random
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .indexing.table import index_vocab as index_vocabulary  # noqa: F401  (re-export)
from .prompts import LETTERS, adds_special_tokens, candidates_block, render
from .tasks import Example
from .line_head import line_ends, line_scores
from .verbalizer import letter_token_ids, response_ids, verbalize

# peft (wrap_lora) and transformers (prompt_cache) are imported on first use: importing them
# costs ~10 s and ~2 s, and the modules that import this one for encode/collate never need them

log = logging.getLogger(__name__)

IGNORE = -100


def add_index_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add tokens to the vocabulary; new embedding rows start at the mean of the old ones."""
    added = tokenizer.add_tokens(tokens)
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    log.info("index tokens: %d added, %d in vocabulary", added, len(ids))
    return ids


def encode(tokenizer, ex: Example, fmt: str, max_len: int, with_response: bool = True,
           lines: bool = False) -> dict:
    """input_ids + labels (-100 on the prompt: loss on the response tokens only).

    A prompt longer than the budget keeps its *end* (candidates and the response marker);
    `truncated` says so, and callers count it. `lines` (the line scorer, ulmrec.line_head):
    a prompt with candidates also gets the token index of each candidate line's end
    ("lines") and the target's place among them ("answer").
    """
    prompt = render(ex.instruction, ex.input, tokenizer, fmt)
    p_ids = tokenizer(prompt, add_special_tokens=adds_special_tokens(fmt, tokenizer))["input_ids"]
    r_ids = response_ids(tokenizer, ex.response, fmt) if with_response else []
    budget = max_len - len(r_ids)
    truncated = len(p_ids) > budget
    ends = line_ends(tokenizer, prompt, p_ids, ex.input) if lines and ex.candidates else None
    if truncated:
        cut = len(p_ids) - budget
        p_ids = p_ids[-budget:]
        if ends is not None:      # a line cut off reads the first kept token (counted as truncated)
            ends = [max(0, e - cut) for e in ends]
    out = {"input_ids": p_ids + r_ids, "labels": [IGNORE] * len(p_ids) + r_ids,
           "truncated": truncated}
    if ex.prior is not None:
        out["prior"] = list(ex.prior)
    if ends is not None:
        out["lines"] = ends
        out["answer"] = ex.candidates.index(ex.target) if ex.target in ex.candidates else -1
    return out


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding, so position -1 is every row's last real token."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[row, width - n:] = torch.tensor(b["input_ids"])
        labels[row, width - n:] = torch.tensor(b["labels"])
        mask[row, width - n:] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any("prior" in b for b in batch):
        # a row without retriever scores (a random list) gets a flat prior: no say in its order
        k = max(len(b["prior"]) for b in batch if "prior" in b)
        out["prior"] = torch.tensor([b.get("prior") or [0.0] * k for b in batch],
                                    dtype=torch.float32)                       # [B, K]
    if any("lines" in b for b in batch):
        # positions move right by each row's left padding; a row without lines reads position
        # 0 and is never scored by them (answer -1)
        k = max(len(b["lines"]) for b in batch if "lines" in b)
        out["lines"] = torch.tensor([[width - len(b["input_ids"]) + e for e in b["lines"]]
                                     if "lines" in b else [0] * k for b in batch])   # [B, K]
        out["answer"] = torch.tensor([b.get("answer", -1) for b in batch])             # [B]
    return out


def wrap_lora(model, r: int = 8, alpha: int = 32, dropout: float = 0.05,
              target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
              trainable_token_ids: list[int] | None = None):
    """LoRA on the attention projections; new index-token rows of the embedding (and of the
    LM head when it is not tied) train too, without unfreezing the whole vocabulary."""
    from peft import LoraConfig, get_peft_model

    trainable = None
    if trainable_token_ids:
        trainable = {"embed_tokens": list(trainable_token_ids)}
        if not getattr(model.config, "tie_word_embeddings", False):
            trainable["lm_head"] = list(trainable_token_ids)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     target_modules=list(target_modules), task_type="CAUSAL_LM",
                     trainable_token_indices=trainable)
    model = get_peft_model(model, cfg)
    trainable_n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %s trainable of %s parameters", f"{trainable_n:,}", f"{total:,}")
    return model


def response_loss(model, batch: dict[str, torch.Tensor], letter_ids: list[int] | None = None,
                  per_example: bool = False, residual_weight: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy over the response tokens, computing LM-head logits only for
    the last positions: with left padding every response sits at the end of its row, and a
    letter answer needs 2 of ~500 positions (the full-vocabulary logits dominate CPU steps).

    With `letter_ids` (the listwise option), a letter answer's token is scored against the
    candidates' letters only — cross-entropy over the 20 letter logits, what the verbalizer
    ranks with — and its EOS is not trained; other responses keep the full-vocabulary loss.

    per_example: each response's mean, averaged over the batch. The token mean lets a
    40-token preference outweigh a 2-token letter answer 20 to 1, so in a six-task mix the
    ranking task, next_item, gets ~3% of the gradient while being ~20% of the examples.

    residual_weight w (letters only): the listwise logits are the letter logits plus
    w · log-softmax of the batch's retriever scores (`prior`), the sum the model is served
    with, so the gradient reaches the LLM only where the retriever's order is wrong.

    A batch with "lines" on a model with a line head (the line scorer, ulmrec.line_head):
    each candidate answer is scored listwise by its line scores instead of letter logits (the
    residual as above); text answers keep the token loss."""
    labels = batch["labels"]
    keep = int((labels != IGNORE).sum(dim=1).max()) + 1   # the logit at t predicts token t+1
    by_lines = "lines" in batch and getattr(model, "line_head", None) is not None
    if by_lines:
        # one decoder pass feeds both reads: the LM head on the last positions (text answers)
        # and the line head at each candidate line's end (candidate answers)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(input_ids=batch["input_ids"],
                                    attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, -keep:])[:, :-1].float()  # [B, keep-1, V]
        rows = torch.arange(len(labels), device=hidden.device)
        line_logits = model.line_head(hidden[rows[:, None], batch["lines"]])     # [B, K]
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=keep)
        logits = out.logits[:, :-1].float()                                    # [B, keep-1, V]
    target = labels[:, -(keep - 1):]                                           # [B, keep-1]
    mask = target != IGNORE                                                    # [B, keep-1]
    tok = torch.nn.functional.cross_entropy(                                   # [B, keep-1]
        logits.transpose(1, 2), target.masked_fill(~mask, 0), reduction="none") * mask
    rows = torch.arange(len(target), device=logits.device)
    first = mask.float().argmax(dim=1)                                         # [B] answer position
    listwise_rows = None
    if by_lines:
        listwise_rows = batch["answer"] >= 0                                   # [B]
        index = batch["answer"].clamp(min=0)                                   # [B] 0..K-1
        scores = line_logits
    elif letter_ids is not None:
        ids = torch.tensor(letter_ids, device=logits.device)
        answers = target[rows, first]                                          # [B]
        # a letter answer is exactly <letter><eos>: rating digits, index tokens and texts are not
        listwise_rows = (mask.sum(dim=1) == 2) & torch.isin(answers, ids)
        index = (answers[:, None] == ids[None]).float().argmax(dim=1)          # [B] 0..19
        scores = logits[rows, first][:, ids]                                   # [B, K]
    if listwise_rows is not None:
        if residual_weight and "prior" in batch:
            prior = batch["prior"].to(scores.device)                           # [B, K]
            scores = scores + residual_weight * torch.log_softmax(prior, dim=1)
        listwise = torch.nn.functional.cross_entropy(scores, index, reduction="none")  # [B]
        at_first = torch.arange(mask.shape[1], device=mask.device)[None] == first[:, None]
        tok = torch.where(listwise_rows[:, None], listwise[:, None] * at_first, tok)  # EOS untrained
        mask = torch.where(listwise_rows[:, None], at_first, mask)
    n = mask.sum(dim=1)                                                        # [B] terms per row
    if per_example:
        return (tok.sum(dim=1) / n.clamp(min=1))[n > 0].mean()
    return tok.sum() / n.sum().clamp(min=1)


def cache_kw(model) -> str:
    """The keyword a causal LM takes its key/value cache by: `cache` in recent transformers,
    `past_key_values` before (and deprecated after)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prompt_cache(model, ids: torch.Tensor, mask: torch.Tensor, copies: int):
    """The key/value cache of `ids` [1, L] (one prompt), repeated for `copies` rows: what
    follows it then runs once per row on top of a prefix that ran once."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
          **{cache_kw(model): cache})
    cache.batch_repeat_interleave(copies)
    return cache


MIN_SHARED = 16     # a shared prefix shorter than this is not worth its own forward pass


def common_prefix(rows: list[list[int]]) -> int:
    """Length of the token prefix every row shares, leaving each row ≥ 1 token of its own."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return max(n, 0)


def last_logits_shared_prefix(model, rows: list[list[int]], pad_id: int) -> torch.Tensor | None:
    """Last-position logits [B, V] of token rows that share a prefix (the system prompt and
    the instruction: ~66 of ~420 tokens of a ranking prompt): the prefix runs once at batch 1,
    its KV cache is repeated for the batch and only the rows' own tokens run, left-padded
    between the prefix and their start. RoPE attention depends on relative positions only,
    so each row sees what it sees unbatched. None when the shared part is too short."""
    p = common_prefix(rows)
    if len(rows) < 2 or p < MIN_SHARED:
        return None
    device = next(model.parameters()).device
    prefix = torch.tensor([rows[0][:p]], device=device)
    cache = prompt_cache(model, prefix, torch.ones_like(prefix), len(rows))
    own = collate([{"input_ids": r[p:], "labels": r[p:]} for r in rows], pad_id)
    mask = own["attention_mask"].to(device)                                    # [B, S]
    position = p + (mask.cumsum(dim=1) - 1).clamp(min=0)                       # [B, S]
    full_mask = torch.cat([torch.ones(len(rows), p, dtype=mask.dtype, device=device), mask], 1)
    out = model(input_ids=own["input_ids"].to(device), attention_mask=full_mask,
                position_ids=position, use_cache=True, logits_to_keep=1, **{cache_kw(model): cache})
    return out.logits[:, -1, :]


@torch.no_grad()
def score_examples(model, tokenizer, examples: list[Example], fmt: str = "auto",
                   max_len: int = 1536, batch_size: int = 8, n_letters: int = 20,
                   progress: bool = True, stats: dict | None = None, shared_prefix: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Letter scores and probabilities [N, n_letters] for next-item prompts (no response).

    A prompt over max_len loses its beginning (encode): how many did is logged, and written to
    `stats` ("prompts", "truncated") when given, so an evaluation can report it.
    `shared_prefix` runs a batch's common token prefix once (serving; same scores up to
    float rounding)."""
    letter_ids = letter_token_ids(tokenizer, n_letters, fmt)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores, probs = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bar = tqdm(range(0, len(examples), batch_size), desc="verbalizer", disable=not progress,
               unit="batch")
    truncated = 0
    by_lines = getattr(model, "line_head", None) is not None
    for start in bar:
        chunk = [encode(tokenizer, ex, fmt, max_len, with_response=False, lines=by_lines)
                 for ex in examples[start:start + batch_size]]
        truncated += sum(c["truncated"] for c in chunk)
        if by_lines:
            batch = collate(chunk, pad)
            s = line_scores(model, batch["input_ids"].to(device),
                            batch["attention_mask"].to(device), batch["lines"])[:, :n_letters]
            scores.append(s.cpu())
            probs.append(torch.softmax(s, dim=-1).cpu())
            continue
        last = last_logits_shared_prefix(model, [c["input_ids"] for c in chunk], pad) \
            if shared_prefix else None
        if last is None:
            batch = collate(chunk, pad)
            last = model(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device),
                         logits_to_keep=1).logits[:, -1, :]
        s, p = verbalize(last, letter_ids)
        scores.append(s.cpu())
        probs.append(p.cpu())
    if was_training:
        model.train()
    if truncated:
        log.warning("%d of %d prompts were longer than max_len %d and lost their beginning",
                    truncated, len(examples), max_len)
    if stats is not None:
        stats.update(prompts=len(examples), truncated=truncated)
    if not scores:
        return torch.zeros(0, n_letters), torch.zeros(0, n_letters)
    return torch.cat(scores), torch.cat(probs)


def score_orders(model, tokenizer, examples: list[Example], orders: int, seed: int = 0,
                 **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """score_examples averaged over `orders` candidate orders (permutation self-consistency):
    the identity and orders-1 random shuffles of each list, each item's letter log-probability
    taken back to the item's own place, then averaged. What the LLM gives a letter because of
    its place washes out; what it gives an item stays. Returns (mean log-probabilities,
    their softmax) [N, K] in the examples' own candidate order; orders=1 is score_examples."""
    if orders <= 1:
        return score_examples(model, tokenizer, examples, **kwargs)
    rng = random.Random(seed)
    total = None
    for k in range(orders):
        perms = [list(range(len(ex.candidates))) for ex in examples]
        if k:
            for p in perms:
                rng.shuffle(p)
        shown = []
        for ex, p in zip(examples, perms):
            # the candidate block closes every next-item prompt: rebuilt in the new order
            head, _, block = ex.input.rpartition("Candidates:\n")
            titles = [line.split(") ", 1)[1] for line in block.split("\n")]
            cands = [ex.candidates[j] for j in p]
            shown.append(replace(
                ex, candidates=cands, input=head + candidates_block([titles[j] for j in p]),
                prior=None if ex.prior is None else [ex.prior[j] for j in p],
                response=LETTERS[cands.index(ex.target)] if ex.target is not None else ""))
        _, probs = score_examples(model, tokenizer, shown, **kwargs)
        logp = torch.log(probs.clamp_min(1e-30))                                   # [N, K] shown order
        back = torch.empty_like(logp)
        for row, p in enumerate(perms):
            back[row, p] = logp[row]                                               # item j ← its letter
        total = back if total is None else total + back
    mean = total / orders
    return mean, torch.softmax(mean, dim=1)
