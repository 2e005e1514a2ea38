"""Joint training of the review attention A (eq. 1) and the RQ-VAE (eqs. 2–6), then codes.

Inputs are fixed: the encoder's embeddings of the unique review texts [T, D] and of the
users' original IDs [U, D]. Each step draws a batch of users, pools their reviews with A
into x_u, and minimises L_RECON + L_RQ; gradients reach A through x_u. Checkpoints are
written every `ckpt_every` epochs so a killed run resumes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .attention import ReviewAttention, batch_reviews
from .collisions import resolve_collisions
from .reviews import ReviewSets
from .rqvae import RQVAE, RQVAEConfig, loss_fn
from ..paths import atomic_write
from .table import INDEX_KINDS, codebook_usage

log = logging.getLogger(__name__)


@dataclass
class IndexConfig:
    """Personalised user indexing (ULMRec §4.1)."""
    dataset: str = field(default="gift-cards", metadata={"help": "dataset name (ulmrec.data)"})
    kind: str = field(default="pid", metadata={
        "help": "pid = review/RQ-VAE codes; nid = numeric ids; oid = original reviewerIDs",
        "choices": list(INDEX_KINDS)})
    use_preference: bool = field(default=False, metadata={
        "help": "add the authors' GPT-3.5 preference sentence as a review (LEAK-PRONE)"})
    encoder: str = field(default="", metadata={
        "help": "sentence encoder folder or HF id; '' = packaged all-MiniLM-L6-v2"})
    max_length: int = field(default=256, metadata={"help": "encoder max tokens per text"})
    encode_batch_size: int = 64
    hidden: tuple[int, ...] = field(default=(512, 256, 128), metadata={
        "help": "MLP hidden sizes of the RQ-VAE encoder (decoder mirrors them)"})
    e_dim: int = 32
    levels: int = 4
    codebook_size: int = 256
    beta: float = 0.25
    dropout: float = 0.0
    epochs: int = 300
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4
    kmeans_iters: int = 50
    sk_epsilon: float = 0.003
    sk_iters: int = 50
    max_rounds: int = 20
    fallback: bool = field(default=True, metadata={
        "help": "after the Sinkhorn rounds, move users still colliding to the nearest free code"})
    seed: int = 42
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads; 1 is fastest on a busy shared box (2 threads spin-wait)"})
    ckpt_every: int = 50
    resume: bool = True
    out: str = field(default="", metadata={
        "help": "run folder under runs/<dataset>/ ('' → index, index-pref, index-nid, index-oid)"})

    def run_name(self) -> str:
        if self.out:
            return self.out
        if self.kind != "pid":
            return f"index-{self.kind}"
        return "index-pref" if self.use_preference else "index"

    def rqvae(self, in_dim: int) -> RQVAEConfig:
        return RQVAEConfig(in_dim=in_dim, hidden=tuple(self.hidden), e_dim=self.e_dim,
                           levels=self.levels, codebook_size=self.codebook_size, beta=self.beta,
                           dropout=self.dropout)


@dataclass
class Inputs:
    """Tensors the trainer needs, built once from ReviewSets + embeddings."""
    texts: torch.Tensor     # [T, D] unique review embeddings
    ids: torch.Tensor       # [U, D] original-ID embeddings (row order of ReviewSets)
    offsets: torch.Tensor   # [U+1]
    text_ids: torch.Tensor  # [R]

    @classmethod
    def build(cls, sets: ReviewSets, text_emb: np.ndarray, id_emb: np.ndarray) -> "Inputs":
        if text_emb.shape[0] != len(sets.texts) or id_emb.shape[0] != len(sets.users):
            raise ValueError(f"embeddings {text_emb.shape}/{id_emb.shape} do not match "
                             f"{len(sets.texts)} texts / {len(sets.users)} users")
        return cls(torch.from_numpy(np.ascontiguousarray(text_emb, np.float32)),
                   torch.from_numpy(np.ascontiguousarray(id_emb, np.float32)),
                   torch.from_numpy(sets.offsets), torch.from_numpy(sets.text_ids))

    @property
    def num_users(self) -> int:
        return len(self.ids)


def pool(attn: ReviewAttention, inp: Inputs, rows: torch.Tensor):
    """x_u [B, D] and the attention weights [R] of users `rows` (eq. 1)."""
    tid, owner = batch_reviews(inp.offsets, inp.text_ids, rows)
    return attn(inp.texts[tid], owner, inp.ids[rows])


@torch.no_grad()
def user_vectors(attn: ReviewAttention, inp: Inputs, batch: int = 4096) -> torch.Tensor:
    return torch.cat([pool(attn, inp, torch.arange(s, min(s + batch, inp.num_users)))[0]
                      for s in range(0, inp.num_users, batch)])


def save_weights(path: Path, model: RQVAE, attn: ReviewAttention, meta: dict) -> None:
    tensors = {f"rqvae.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors["attention.A"] = attn.A.detach().contiguous()
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"config": json.dumps(meta)}))


def load_weights(path: Path, model: RQVAE, attn: ReviewAttention) -> None:
    tensors = load_file(path)
    attn.A.data.copy_(tensors.pop("attention.A"))
    model.load_state_dict({k.removeprefix("rqvae."): v for k, v in tensors.items()})


def train(cfg: IndexConfig, inp: Inputs, ckpt_dir: Path | None = None):
    """→ (model, attn, history). Resumes from ckpt_dir/last.safetensors when the config matches."""
    torch.manual_seed(cfg.seed)
    model = RQVAE(cfg.rqvae(inp.texts.shape[1]))
    attn = ReviewAttention(inp.texts.shape[1])
    opt = torch.optim.AdamW(list(model.parameters()) + list(attn.parameters()), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start = 0
    key = _train_key(cfg)
    ckpt = ckpt_dir / "last.safetensors" if ckpt_dir else None
    state_path = ckpt_dir / "last.json" if ckpt_dir else None
    if cfg.resume and ckpt and ckpt.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("key") == key:
            load_weights(ckpt, model, attn)
            opt.load_state_dict(torch.load(ckpt_dir / "optim.pt", weights_only=True))
            start, history = state["epoch"], state["history"]
            log.info("resuming from epoch %d (%s)", start, ckpt)
    if start == 0:
        # k-means on the z of the initial x_u (A = I) so every code starts near real users
        model.eval()
        with torch.no_grad():
            x0 = user_vectors(attn, inp)
            model.set_input_stats(x0)
            z = model.encode(x0)
        model.quantizer.kmeans_init(z, iters=cfg.kmeans_iters, seed=cfg.seed)
        log.info("codebooks initialised by k-means on %d users", len(z))

    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start):  # keep the shuffles of a resumed run identical to an unbroken one
        torch.randperm(inp.num_users, generator=gen)
    bar = tqdm(range(start, cfg.epochs), desc="rq-vae", unit="epoch", initial=start,
               total=cfg.epochs)
    for epoch in bar:
        model.train()
        perm = torch.randperm(inp.num_users, generator=gen)
        sums = np.zeros(3)
        codes_seen = []
        for s in range(0, inp.num_users, cfg.batch_size):
            rows = perm[s:s + cfg.batch_size]
            x, _ = pool(attn, inp, rows)                       # [B, D]
            x_hat, rq_loss, codes = model(x)
            loss, recon = loss_fn(x, x_hat, rq_loss, model.x_std)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += np.array([loss.item(), recon.item(), rq_loss.item()]) * len(rows)
            codes_seen.append(codes)
        loss_, recon_, rq_ = sums / inp.num_users
        used = [len(torch.unique(c)) for c in torch.cat(codes_seen).T]
        history.append({"epoch": epoch + 1, "loss": loss_, "recon": recon_, "rq": rq_,
                        "used": used})
        bar.set_postfix(recon=f"{recon_:.5f}", rq=f"{rq_:.5f}", used="/".join(map(str, used)))
        if ckpt and ((epoch + 1) % cfg.ckpt_every == 0 or epoch + 1 == cfg.epochs):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            save_weights(ckpt, model, attn, {"key": key})
            atomic_write(ckpt_dir / "optim.pt", lambda p: torch.save(opt.state_dict(), p))
            atomic_write(state_path, lambda p: Path(p).write_text(json.dumps(
                {"key": key, "epoch": epoch + 1, "history": history})))
    if history:
        h = history[-1]
        log.info("trained %d epochs: recon %.6f, rq %.6f, codes used per level %s",
                 h["epoch"], h["recon"], h["rq"], h["used"])
    return model.eval(), attn.eval(), history


def _train_key(cfg: IndexConfig) -> str:
    """Fields that change the trained weights (not epochs: a longer run may extend a shorter)."""
    skip = {"epochs", "ckpt_every", "threads", "resume", "out", "sk_epsilon", "sk_iters", "max_rounds",
            "fallback", "kind"}
    return json.dumps({k: v for k, v in asdict(cfg).items() if k not in skip}, sort_keys=True,
                      default=list)


@torch.no_grad()
def make_index(cfg: IndexConfig, model: RQVAE, attn: ReviewAttention, inp: Inputs):
    """Greedy codes for all users, then collision resolution → (codes [U, L], report)."""
    x = user_vectors(attn, inp)                                   # [U, D]
    x_hat, rq_loss, _ = model(x)
    codes, residuals = model.codes(x)                             # [U, L], [U, L+1, e]
    greedy = codes.numpy()
    final, coll = resolve_collisions(greedy, residuals[:, -2], model.quantizer.codebooks[-1].detach(),
                                     eps=cfg.sk_epsilon, iters=cfg.sk_iters,
                                     max_rounds=cfg.max_rounds, fallback=cfg.fallback)
    _, alpha = pool(attn, inp, torch.arange(inp.num_users))
    report = {
        "recon_loss": float(loss_fn(x, x_hat, rq_loss, model.x_std)[1]),
        "recon_loss_raw_mse": float(torch.nn.functional.mse_loss(x_hat, x)),
        "rq_loss": float(rq_loss),
        "codebook_usage_greedy": codebook_usage(greedy, cfg.codebook_size),
        "codebook_usage": codebook_usage(final, cfg.codebook_size),
        "collisions": coll,
        "attention": {**attention_stats(alpha, inp),
                      "A_minus_I_fro": round(float((attn.A - torch.eye(len(attn.A))).norm()), 4)},
        "x_mean_norm": float(x.norm(dim=-1).mean()),
    }
    return final, report


def attention_stats(alpha: torch.Tensor, inp: Inputs) -> dict:
    """How peaked eq. 1's weights are: mean max α and mean entropy / log(n) over users with n≥2."""
    lengths = (inp.offsets[1:] - inp.offsets[:-1])
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    top = torch.zeros(len(lengths)).scatter_reduce(0, owner, alpha, "amax", include_self=False)
    ent = torch.zeros(len(lengths)).index_add(0, owner, -alpha * torch.log(alpha.clamp_min(1e-12)))
    many = lengths >= 2
    norm_ent = ent[many] / torch.log(lengths[many].double()).float()
    return {"mean_max_alpha": round(float(top[many].mean()), 4) if many.any() else None,
            "mean_normalised_entropy": round(float(norm_ent.mean()), 4) if many.any() else None}
