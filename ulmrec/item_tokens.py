"""Collaborative item tokens (a LLaRA-style hybrid prompt): each item title in a prompt is
followed by one soft token, the retriever's embedding of that item through a learned linear
projection into the LLM's token space, so that the LLM reads what the sequence model knows
about an item beside its words (a 135M LLM alone ranks games titles at chance: docs/ranker.md).

    it = ItemTokens.from_retriever(runs/<ds>/retrieval/lrurec, hidden=576, first_id=len(tok))
    it.attach(model, tok)          # tokenizer learns <i_1> … <i_N>; hooks on the embedding

To the tokenizer a soft token is an ordinary added token (`<i_17>` for item 17) whose id lies
past the model's embedding rows. A pre-hook on the input embedding swaps those ids for a valid
one and a forward hook writes the projected retriever embedding in their place. No module is
replaced, so PEFT's adapters and checkpoints and every forward path (training, scoring, the
shared-prefix cache) see the soft tokens without knowing of them; the LM head never has rows
for them, so they are never generated.
"""
from __future__ import annotations

import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FILE = "item_tokens.safetensors"


def item_token(item: int) -> str:
    return f"<i_{int(item)}>"


class ItemTokens(nn.Module):
    """table [N+1, d]: the retriever's item embedding, row i = dense item i (0 = padding),
    frozen; proj: d → hidden, trained; first_id: the token id of <i_1>."""

    def __init__(self, table: torch.Tensor, hidden: int, first_id: int):
        super().__init__()
        self.register_buffer("table", table.detach().float().clone())           # [N+1, d]
        self.proj = nn.Linear(table.shape[1], hidden)
        self.first_id = int(first_id)
        self._calls = threading.local()      # one stash per thread: the app serves in threads
        self._hooks = []

    @property
    def num_items(self) -> int:
        return self.table.shape[0] - 1

    @classmethod
    def from_retriever(cls, folder: str | Path, hidden: int, first_id: int, scale: float = 1.0):
        """From a trained retriever run (model.json + model.safetensors). The projection starts
        so that a soft token's norm is `scale` × the table's mean row norm mapped by a random
        orthogonal-ish map: the LLM first sees them about as loud as the retriever made them."""
        weights = load_file(Path(folder) / "model.safetensors")
        table = weights["item_emb.weight"]                                      # [N+1, d]
        it = cls(table, hidden, first_id)
        nn.init.normal_(it.proj.weight, std=scale / table.shape[1] ** 0.5)
        nn.init.zeros_(it.proj.bias)
        return it

    def tokens(self) -> list[str]:
        return [item_token(i) for i in range(1, self.num_items + 1)]

    def attach(self, model, tokenizer) -> "ItemTokens":
        """Teach `tokenizer` the soft tokens and hook `model`'s input embedding; registers
        this module on the model (`model.item_tokens`), so that its projection trains with it."""
        emb = model.get_input_embeddings()
        rows = emb.weight.shape[0] if hasattr(emb, "weight") else emb.num_embeddings
        if self.first_id < rows:
            raise ValueError(f"soft item tokens start at id {self.first_id}, inside the model's "
                             f"{rows} embedding rows: add them after resizing for index tokens")
        if len(tokenizer) != self.first_id:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens; soft item tokens must "
                             f"start right after them, at {self.first_id}")
        tokenizer.add_tokens(self.tokens())
        self.to(next(model.parameters()).device)
        model.add_module("item_tokens", self)
        self._hooks = [emb.register_forward_pre_hook(self._swap_ids),
                       emb.register_forward_hook(self._write_vectors)]
        return self

    def detach_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _swap_ids(self, module, args):
        ids = args[0]
        soft = ids >= self.first_id                                              # [B, L]
        self._calls.pending = (soft, (ids - self.first_id + 1).clamp(min=0))
        return (ids.masked_fill(soft, 0),) + tuple(args[1:])

    def _write_vectors(self, module, args, out):
        soft, items = self._calls.pending
        self._calls.pending = None
        if not bool(soft.any()):
            return out
        vec = self.proj(self.table[items[soft]]).to(out.dtype)                 # [S, hidden]
        return out.masked_scatter(soft[..., None], vec)

    def save(self, folder: str | Path) -> None:
        save_file({"table": self.table.cpu().contiguous(),
                   "proj.weight": self.proj.weight.detach().cpu().contiguous(),
                   "proj.bias": self.proj.bias.detach().cpu().contiguous()},
                  str(Path(folder) / FILE), metadata={"first_id": str(self.first_id)})

    @classmethod
    def load(cls, folder: str | Path) -> "ItemTokens | None":
        """The soft item tokens an adapter folder was trained with, or None."""
        path = Path(folder) / FILE
        if not path.exists():
            return None
        with safe_open(str(path), "pt") as f:
            first_id = int(f.metadata()["first_id"])
        w = load_file(str(path))
        it = cls(w["table"], w["proj.weight"].shape[0], first_id)
        it.proj.load_state_dict({"weight": w["proj.weight"], "bias": w["proj.bias"]})
        return it
