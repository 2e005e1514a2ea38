"""Generative top-n over the whole catalogue: constrained beam search with the index trie."""
from __future__ import annotations

import threading

import torch
from tqdm.auto import tqdm

from ..model import cache_kw, collate, encode, prompt_cache
from ..tasks import Example
from .tasks import LcRecData, seq_example
from .trie import build_trie, item_token_ids, prefix_fn


@torch.no_grad()
def generate_topn(model, tok, examples: list[Example], token_items: dict[tuple[int, ...], int],
                  n: int = 10, beams: int = 20, banned_items: list[list[int]] | None = None,
                  fmt: str = "chat", max_len: int = 1024, batch_size: int = 4,
                  trie: dict | None = None, progress: bool = False, share_prompt: bool = False
                  ) -> tuple[list[list[tuple[int, float]]], dict]:
    """Per prompt, the n best items as (item, beam score), best first; and counts of what was
    dropped. `token_items` maps index token-id tuples to items (trie.item_token_ids);
    `banned_items` per prompt are never generated (e.g. the user's history).

    A score is the sum of the item's index-token log-probabilities under the model (the trie
    masks tokens after the softmax, so probability left on invalid tokens is not handed back;
    length_penalty 0: every item has the same length). Scores rank items within one prompt.

    share_prompt (batch_size 1 only): run the prompt through the model once and hand its cache
    to every beam, instead of generate's default of copying the prompt `beams` times before
    the first forward pass (20× the prompt's compute; the app's whole-catalogue tab)."""
    trie = trie or build_trie(token_items)
    by_item = {item: ids for ids, item in token_items.items()}
    depth = len(next(iter(token_items)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results, stats = [], {"invalid_beams": 0, "duplicate_beams": 0}
    for s in tqdm(range(0, len(examples), batch_size), desc="beam search", unit="batch",
                  disable=not progress):
        chunk = [encode(tok, ex, fmt, max_len, with_response=False) for ex in examples[s:s + batch_size]]
        batch = collate(chunk, pad)                                   # left-padded [B, W]
        width = batch["input_ids"].shape[1]
        banned = None
        if banned_items is not None:
            banned = [{by_item[i] for i in b if i in by_item} for b in banned_items[s:s + batch_size]]
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        extra = {}
        if share_prompt and len(chunk) == 1 and width > 1:
            # all but the last prompt token once, for every beam: generate then runs only the
            # last token per beam before the first search step
            extra[cache_kw(model)] = prompt_cache(model, ids[:, :-1], mask[:, :-1], beams)
        out = model.generate(
            input_ids=ids, attention_mask=mask, **extra,
            num_beams=beams, num_return_sequences=beams, max_new_tokens=depth, do_sample=False,
            prefix_allowed_tokens_fn=prefix_fn(trie, width, pad, banned), early_stopping=True,
            return_dict_in_generate=True, output_scores=True, pad_token_id=pad,
            length_penalty=0.0)
        seqs = out.sequences[:, width:].cpu().tolist()                 # [B*beams, depth]
        scores = out.sequences_scores.cpu().tolist()                   # [B*beams]
        for row in range(len(chunk)):
            ranked, seen = [], set()
            for k in range(row * beams, (row + 1) * beams):
                item = token_items.get(tuple(seqs[k][:depth]))
                # HF starts all but the first beam at -1e9: such beams only copy real ones
                if item is None or scores[k] < -1e8:
                    stats["invalid_beams"] += item is None
                    continue
                if item in seen:
                    stats["duplicate_beams"] += 1
                    continue
                seen.add(item)
                ranked.append((item, float(scores[k])))
            ranked.sort(key=lambda x: -x[1])
            results.append(ranked[:n])
    if was_training:
        model.train()
    return results, stats


_CATALOGUE: dict[tuple[int, int], tuple] = {}
_CATALOGUE_LOCK = threading.Lock()


def catalogue_tables(tok, index_table) -> tuple[dict[int, str], dict[tuple[int, ...], int], dict]:
    """(item → index string, token ids → item, trie) for one tokenizer and item index, built
    once and kept: the whole-catalogue tab asks for them on every request. Keyed by the two
    objects' identities (a bundle keeps both for its lifetime; the entry holds them alive, so
    an id is never reused while its entry exists)."""
    key = (id(tok), id(index_table))
    with _CATALOGUE_LOCK:
        hit = _CATALOGUE.get(key)
        if hit is None or hit[0] is not tok or hit[1] is not index_table:
            index = dict(zip(index_table["item"].astype(int).tolist(), index_table["index"].tolist()))
            token_items = item_token_ids(tok, index_table)
            hit = _CATALOGUE[key] = (tok, index_table, index, token_items, build_trie(token_items))
    return hit[2], hit[3], hit[4]


def recommend(model, tok, history_item_ids: list[int], index_table, n: int = 10,
              beams: int = 20, fmt: str = "chat", max_history: int = 20,
              exclude_history: bool = True) -> list[tuple[int, str, float]]:
    """Top-n items of the whole catalogue for one history: [(item_id, index_string, score)].

    index_table: the item index (columns item, index) written by `train.lcrec`'s index stage;
    the model must carry the index tokens (add_index_tokens) it was fine-tuned with."""
    index, token_items, trie = catalogue_tables(tok, index_table)
    history = [int(i) for i in history_item_ids if int(i) in index]
    data = LcRecData(index=index, titles={}, texts={}, train=None)
    ex = seq_example(data, -1, history, None, max_history)
    [top], _ = generate_topn(model, tok, [ex], token_items, n=n, beams=max(beams, n),
                             banned_items=[history] if exclude_history else None, fmt=fmt,
                             batch_size=1, trie=trie, share_prompt=True)
    return [(item, index[item], score) for item, score in top]
