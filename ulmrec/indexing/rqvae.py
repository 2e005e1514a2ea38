"""RQ-VAE (eqs. 2–6): MLP encoder x → z, residual quantisation of z over L codebooks, MLP
decoder ẑ → x̂.

    d_i = argmin_k ||r_i − v_k^i||²      (2)      r_{i+1} = r_i − v_{d_i}^i      (3)
    L_RECON = ||x − x̂||²                 (4)
    L_RQ = Σ_i ||sg[r_i] − v_{d_i}^i||² + β ||r_i − sg[v_{d_i}^i]||²              (5)

Codebooks are initialised by k-means on the residuals of the whole training set, level by
level, so no codeword starts far from the data (random init leaves most codes dead).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RQVAEConfig:
    in_dim: int = 384
    hidden: tuple[int, ...] = (512, 256, 128)
    e_dim: int = 32
    levels: int = 4
    codebook_size: int = 256
    beta: float = 0.25
    dropout: float = 0.0


def mlp(dims: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:  # no activation on the output: z and x̂ are unbounded
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResidualQuantizer(nn.Module):
    def __init__(self, levels: int, size: int, dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.codebooks = nn.Parameter(torch.randn(levels, size, dim) * 0.01)  # [L, K, e]

    @property
    def levels(self) -> int:
        return self.codebooks.shape[0]

    def distances(self, r: torch.Tensor, level: int) -> torch.Tensor:
        """Squared L2 distance of residuals r [B, e] to every codeword of `level` → [B, K]."""
        c = self.codebooks[level]
        return (r * r).sum(-1, keepdim=True) - 2 * r @ c.T + (c * c).sum(-1)

    def forward(self, z: torch.Tensor):
        """z [B, e] → (ẑ with straight-through grads [B, e], codes [B, L], residuals [B, L+1, e],
        rq loss). residuals[:, i] is r_i; residuals[:, L] is what no codebook explained."""
        r, loss = z, z.new_zeros(())
        codes, residuals, total = [], [z], torch.zeros_like(z)
        for level in range(self.levels):
            d = self.distances(r.detach(), level)                   # [B, K]
            idx = d.argmin(-1)                                       # [B]      eq. 2
            v = self.codebooks[level][idx]                           # [B, e]
            loss = loss + F.mse_loss(v, r.detach()) + self.beta * F.mse_loss(r, v.detach())
            r = r - v                                                # eq. 3
            total = total + v
            codes.append(idx)
            residuals.append(r)
        # decoder sees Σ v in value, but reconstruction grads reach the encoder through z
        z_q = z + (total - z).detach()
        return z_q, torch.stack(codes, 1), torch.stack(residuals, 1), loss

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, iters: int = 50, seed: int = 0) -> None:
        """Codebook i := k-means centres of the level-i residuals of z [N, e]."""
        from sklearn.cluster import KMeans   # on first use: ~3 s to import, and only k-means init needs it
        r = z.detach().double().numpy()
        k = self.codebooks.shape[1]
        rng = np.random.default_rng(seed)
        for level in range(self.levels):
            fit_on = r
            if len(r) < k:  # fewer points than codes: jittered copies keep k-means defined
                extra = r[rng.integers(0, len(r), k - len(r))]
                fit_on = np.concatenate([r, extra + 1e-4 * rng.standard_normal(extra.shape)])
            km = KMeans(n_clusters=k, n_init=1, max_iter=iters, random_state=seed).fit(fit_on)
            centres = km.cluster_centers_
            self.codebooks.data[level] = torch.from_numpy(centres).to(self.codebooks.dtype)
            r = r - centres[km.predict(r)]


class RQVAE(nn.Module):
    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = mlp([cfg.in_dim, *cfg.hidden, cfg.e_dim], cfg.dropout)
        self.quantizer = ResidualQuantizer(cfg.levels, cfg.codebook_size, cfg.e_dim, cfg.beta)
        self.decoder = mlp([cfg.e_dim, *reversed(cfg.hidden), cfg.in_dim], cfg.dropout)
        # Fixed per-dimension standardisation of x. Pooled unit-length sentence embeddings vary
        # by ~0.03 per dimension around a large shared mean, so an unscaled L_RECON is tiny next
        # to L_RQ and the encoder collapses z onto one codeword (seen: 1/256 codes used).
        self.register_buffer("x_mean", torch.zeros(cfg.in_dim))
        self.register_buffer("x_std", torch.ones(cfg.in_dim))

    @torch.no_grad()
    def set_input_stats(self, x: torch.Tensor) -> None:
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(x.std(0).clamp_min(1e-6))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder((x - self.x_mean) / self.x_std)       # [B, e]

    def forward(self, x: torch.Tensor):
        """x [B, in] → (x̂ [B, in] in x's units, rq loss, codes [B, L])."""
        z_q, codes, _, rq_loss = self.quantizer(self.encode(x))
        return self.decoder(z_q) * self.x_std + self.x_mean, rq_loss, codes

    @torch.no_grad()
    def codes(self, x: torch.Tensor):
        """Greedy codes [N, L] and residuals [N, L+1, e] (eval mode: no dropout)."""
        _, codes, residuals, _ = self.quantizer(self.encode(x))
        return codes, residuals


def loss_fn(x: torch.Tensor, x_hat: torch.Tensor, rq_loss: torch.Tensor,
            scale: torch.Tensor | None = None):
    """Eq. 6: L_RECON + L_RQ; L_RECON is the mean squared error per element (as LC-Rec),
    measured in standardised units when `scale` (the per-dimension std of x) is given."""
    diff = x_hat - x if scale is None else (x_hat - x) / scale
    recon = (diff * diff).mean()
    return recon + rq_loss, recon
