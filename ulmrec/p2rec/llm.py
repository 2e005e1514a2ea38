"""The user-level SFT model of P2Rec (§4.1.2, eqs. 2–3).

    h = LLM(p_inst ; linear_proj([e_v1 .. e_vn]) ; p_res)[last position]      eq. 2
    ĝ = softmax(W_gp h + b_gp)                                                  eq. 3

Items enter the LLM not as text but as the retriever's (frozen) item embeddings projected into
the token-embedding space, one virtual token per item (E4SRec style): the LLM sees the
collaborative structure the retriever learned, and no item needs a title. The backbone gets
LoRA; the projection and the group head are trained in full.
"""
from __future__ import annotations

import torch
from torch import nn


def instruction(k: int) -> str:
    return (f"Given the user's purchase history, predict the user's distribution among {k} "
            "purchase preferences.\nPurchase history:")


RESPONSE = "\nResponse:"


def decoder(llm) -> nn.Module:
    """The transformer body (no LM head) of a causal LM, through a peft wrapper if any:
    only the last hidden state is needed, and the [T, vocab] logits would dominate CPU time."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.get_decoder()


class P2RecLM(nn.Module):
    def __init__(self, llm, tokenizer, item_table: torch.Tensor, k: int, max_items: int = 50):
        super().__init__()
        self.llm = llm
        self.max_items = max_items
        self.register_buffer("items", item_table.float(), persistent=False)       # [N+1, d] frozen
        width = llm.get_input_embeddings().weight.shape[1]
        self.proj = nn.Linear(item_table.shape[1], width)                         # eq. 2 linear_proj
        self.head = nn.Linear(width, k)                                           # eq. 3 W_gp, b_gp
        ids = lambda text: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        self.register_buffer("prefix_ids", ids(instruction(k)), persistent=False)  # [P]
        self.register_buffer("suffix_ids", ids(RESPONSE), persistent=False)        # [S]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What SFT changes (LoRA, projection, head): the frozen backbone is rebuilt from disk."""
        return {n: p.detach().cpu() for n, p in self.named_parameters() if p.requires_grad}

    def embed(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds [B, T, D] and attention mask [B, T], left-padded so that position -1
        is every row's last real token ("Response:")."""
        tok = self.llm.get_input_embeddings()
        prefix, suffix = tok(self.prefix_ids), tok(self.suffix_ids)               # [P, D], [S, D]
        rows = [torch.cat([prefix, self.proj(self.items[torch.as_tensor(h[-self.max_items:],
                                                                          device=prefix.device)]),
                           suffix]) for h in histories]                           # each [P+n+S, D]
        width = max(r.shape[0] for r in rows)
        x = prefix.new_zeros(len(rows), width, prefix.shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=prefix.device)
        for i, r in enumerate(rows):
            x[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return x, mask

    def forward(self, histories: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(knowledge embedding h [B, D], group distribution ĝ [B, K]) for item-id histories."""
        x, mask = self.embed(histories)
        # positions count from each row's first real token, as if it were unpadded
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        out = decoder(self.llm)(inputs_embeds=x, attention_mask=mask, position_ids=pos)
        h = out.last_hidden_state[:, -1].float()                                   # [B, D]
        return h, torch.softmax(self.head(h), -1)


def add_lora(llm, r: int = 8, alpha: int = 32, dropout: float = 0.05,
             targets: tuple[str, ...] = ("q_proj", "v_proj")):
    """LoRA on the attention projections; every other backbone weight is frozen."""
    from peft import LoraConfig, get_peft_model   # on first use: importing peft costs ~10 s
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                     target_modules=list(targets))
    return get_peft_model(llm, cfg)


def sft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 4: squared error summed over the K groups, averaged (not summed) over the batch so
    the learning rate does not depend on the batch size."""
    return ((pred - target) ** 2).sum(-1).mean()
