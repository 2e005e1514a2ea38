"""Seed ensembles: several trained retrievers score as one (beyond the paper).

Each member's scores become log-probabilities over the catalogue (so members with different
score scales weigh alike) and the ensemble averages them. `encode` stacks the members' hidden
states, so the ensemble fits every function that calls model.score(model.encode(x)[:, -1]).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .trainer import load_retriever


class ScoreEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one retriever")
        self.members = nn.ModuleList(members)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """items [B, L] → hidden states [B, L, M, d] of the M members."""
        return torch.stack([m.encode(items) for m in self.members], dim=2)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., M, d] → mean member log-probabilities over every item id [..., N+1]."""
        logp = [m.score(hidden[..., i, :]).float().log_softmax(-1) for i, m in enumerate(self.members)]
        return torch.stack(logp).mean(0)


def load_ensemble(folders: list[str | Path], device="cpu") -> tuple[ScoreEnsemble, list[dict]]:
    """(ensemble in eval mode, each member's model.json); members must share the catalogue."""
    loaded = [load_retriever(f, device) for f in folders]
    sizes = {spec["num_items"] for _, spec in loaded}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members disagree on the catalogue size: {sorted(sizes)}")
    return ScoreEnsemble([m for m, _ in loaded]).to(device).eval(), [s for _, s in loaded]
