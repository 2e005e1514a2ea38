"""The letter verbalizer: one forward pass → next-token logits of "A".."T" → candidate scores.

The letter ids come from the very function that encodes training responses, so ranking
reads the logit of exactly the token that training supervised (LlamaRec trained "A" but
ranked with "▁A", a different token: that bug cannot happen here, and a test pins it).
"""
from __future__ import annotations

import torch

from .prompts import LETTERS, response_text


def response_ids(tokenizer, response: str, fmt: str = "auto") -> list[int]:
    """Token ids of a response as training sees them after a prompt of format `fmt`: the
    text (with the format's lead, e.g. ' B' after the plain 'Answer:'), then EOS."""
    ids = tokenizer(response_text(response, fmt, tokenizer), add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def letter_token_ids(tokenizer, n: int = len(LETTERS), fmt: str = "auto") -> list[int]:
    """The first response token of each letter answer after a prompt of format `fmt`; each
    letter must be one token."""
    out = []
    for letter in LETTERS[:n]:
        ids = response_ids(tokenizer, letter, fmt)[:-1]
        if len(ids) != 1:
            raise ValueError(f"letter {letter!r} is {len(ids)} tokens in this tokenizer; "
                             "the verbalizer needs single-token letters")
        out.append(ids[0])
    if len(set(out)) != len(out):
        raise ValueError("two letters share a token id")
    return out


def verbalize(last_logits: torch.Tensor, letter_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """last_logits [B, V] → (letter scores [B, n], softmax probabilities over the letters [B, n])."""
    scores = last_logits[:, letter_ids].float()                                   # [B, n]
    return scores, torch.softmax(scores, dim=-1)
