"""The line scorer (beyond the paper): each candidate is scored on its own line, not by letter.

    head = LineHead.fresh(hidden=576).attach(model)      # model.line_head; 576 weights, zero
    scores = line_scores(model, ids, mask, lines)          # [B, K] from the hidden state at
                                                           # the last token of each candidate line

The letter verbalizer asks the LLM two things at once at the prompt's last token: which
candidate fits the history, and which letter names it. A 135M backbone trained on a few
thousand prompts does not learn the second hop (its letter term ranks games lists at chance,
docs/ranker.md). Here the hidden state at the end of candidate i's line, which has attended to
the history and to that title, goes through one learned vector to candidate i's score: a
listwise cross-encoder read with the same 20-way cross-entropy, the same residual over the
retriever and the same prompts. The vector starts at zero, so a residual model starts exactly
at its retriever's order and its LLM term at a flat score; the gradient first shapes the
vector, then reaches the LoRA through it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

FILE = "line_head.safetensors"
BLOCK = "Candidates:\n"     # how ulmrec.prompts.candidates_block opens every candidate list


class LineHead(nn.Module):
    """weight [hidden]: a candidate line's score is its end token's final hidden state · weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())             # [H]

    @classmethod
    def fresh(cls, hidden: int) -> "LineHead":
        return cls(torch.zeros(hidden))

    def attach(self, model) -> "LineHead":
        """Register on `model` (`model.line_head`), so that it trains and checkpoints with it."""
        self.to(next(model.parameters()).device)
        model.add_module("line_head", self)
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() @ self.weight                                     # [..., H] → [...]

    def save(self, folder: str | Path) -> None:
        save_file({"weight": self.weight.detach().cpu().contiguous()}, str(Path(folder) / FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "LineHead | None":
        """The line head an adapter folder was trained with, or None (a letter-scored run)."""
        path = Path(folder) / FILE
        return cls(load_file(str(path))["weight"]) if path.exists() else None


def line_ends(tokenizer, prompt: str, ids: list[int], input_text: str) -> list[int]:
    """Token index (into `ids`, the tokenized `prompt`) of the last token of each candidate
    line of the candidate block that closes `input_text`. Read from the tokenizer's character
    offsets, so a title's last sub-word is found whatever merges the tokenizer made."""
    start = prompt.rfind(BLOCK)
    if start < 0:
        raise ValueError("the line scorer needs a next-item prompt with a candidate block")
    block = input_text[input_text.rfind(BLOCK) + len(BLOCK):]
    pos = start + len(BLOCK)
    ends = []
    for line in block.split("\n"):
        pos += len(line)
        ends.append(pos)
        pos += 1
    if prompt[start + len(BLOCK):ends[-1]] != block:
        raise ValueError("the prompt template changed the candidate block's text")
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    # the special tokens a plain prompt puts in front (BOS) shift every index by their count
    shift = len(ids) - len(enc["input_ids"])
    if shift < 0 or list(ids[shift:]) != list(enc["input_ids"]):
        raise ValueError("the prompt's tokens differ from its text's tokens")
    tok_end = np.array([e for _, e in enc["offset_mapping"]])
    return [int(np.searchsorted(tok_end, e, side="left")) + shift for e in ends]


def line_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lines: torch.Tensor) -> torch.Tensor:
    """[B, K] line scores: the decoder's final (normed) hidden state at positions `lines`
    [B, K] through `model.line_head`. The LM head never runs: no vocabulary logits at all."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.arange(len(lines), device=hidden.device)[:, None]              # [B, 1]
    return model.line_head(hidden[rows, lines.to(hidden.device)])                # [B, K]
