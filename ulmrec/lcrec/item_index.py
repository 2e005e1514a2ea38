"""Item indices (LC-Rec §III-B) with the user-index machinery of ulmrec.indexing.

An item is a 'user with exactly one review': its text (title + description). Fed through
ulmrec.indexing.fit that way, the eq.-1 attention weight is 1 for every row, so x = the
item's own embedding and fit.train / fit.make_index are exactly LC-Rec's RQ-VAE (same
4 × 256 × 32 codebooks, k-means init, standardised inputs) followed by the uniform
semantic mapping (Sinkhorn on the last level for colliding groups). Nothing is copied.
The matrix A of the attention gets no gradient here (softmax over one review is 1).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..indexing.fit import IndexConfig, Inputs, make_index, train
from ..indexing.table import level_letter, token_string

log = logging.getLogger(__name__)


def item_texts(ds) -> tuple[np.ndarray, list[str]]:
    """(item ids [N] sorted, texts [N]): title, plus the description where the data has one
    (the release split games/beauty has titles only)."""
    items = ds.items.sort_values("item")
    titles = items["title"].fillna("").astype(str).str.strip()
    if "description" in items.columns:
        desc = items["description"].fillna("").astype(str).str.strip()
        texts = [f"{t}. {d}" if d else t for t, d in zip(titles, desc)]
    else:
        texts = titles.tolist()
    return items["item"].to_numpy(np.int64), texts


def single_text_inputs(emb: np.ndarray) -> Inputs:
    """Embeddings [N, D] as fit.Inputs where row i owns exactly text i (x_i = emb_i)."""
    e = torch.from_numpy(np.ascontiguousarray(emb, np.float32))
    n = len(e)
    return Inputs(texts=e, ids=e, offsets=torch.arange(n + 1, dtype=torch.long),
                  text_ids=torch.arange(n, dtype=torch.long))


@torch.no_grad()
def llm_embed(model, tok, texts: list[str], batch_size: int = 16, max_length: int = 128) -> np.ndarray:
    """[N] texts → [N, H] mean-pooled last hidden states of a causal LM (LC-Rec uses the LLM's
    own embedding of the item text); L2-normalised like the sentence encoder."""
    out = []
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        for s in range(0, len(texts), batch_size):
            batch = tok(texts[s:s + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
            hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # [B, T, H]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)          # [B, H]
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).numpy())
    finally:
        tok.padding_side = side
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def build_item_index(items: np.ndarray, emb: np.ndarray, cfg: IndexConfig,
                     ckpt_dir: Path | None = None) -> tuple[pd.DataFrame, dict]:
    """items [N], embeddings [N, D] → (table item, a, b, c, d, index; report).

    The table has one unique index per item (resolve_collisions raises otherwise)."""
    inp = single_text_inputs(emb)
    model, attn, history = train(cfg, inp, ckpt_dir=ckpt_dir)
    codes, report = make_index(cfg, model, attn, inp)            # [N, L]
    report.pop("attention", None)  # one text per row: the attention is trivially 1
    report["history_last"] = history[-1] if history else None
    table = pd.DataFrame({"item": items.astype(np.int64)})
    for lv in range(codes.shape[1]):
        table[level_letter(lv)] = codes[:, lv].astype(np.int64)
    table["index"] = [token_string(row) for row in codes.tolist()]
    if table["index"].duplicated().any():  # resolve_collisions guarantees this; keep it loud
        raise RuntimeError("item index has duplicates after collision resolution")
    return table, report


def index_strings(table: pd.DataFrame) -> dict[int, str]:
    """item id → '<a_1><b_2><c_3><d_4>'."""
    return dict(zip(table["item"].astype(int).tolist(), table["index"].tolist()))
