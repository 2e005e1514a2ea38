"""Build the user-index table of a dataset (ULMRec §4.1); the command line is train/index.py.

Writes runs/<dataset>/<index|index-pref|index-nid|index-oid>/: user_index.parquet,
user_index.json, summary.json and (pid) model.safetensors.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset
from .collisions import collision_stats
from .encoder import embed_cached, load_encoder
from .fit import IndexConfig, Inputs, make_index, save_weights, train
from .reviews import build_review_sets
from .table import build_table, codebook_usage, release_codes, write_table
from ..paths import atomic_write, runs_root

log = logging.getLogger("ulmrec.indexing")


def run(cfg: IndexConfig) -> dict:
    """Encode, train and index (or tabulate an id kind); the summary written beside the table."""
    t0 = time.time()
    torch.set_num_threads(max(1, cfg.threads))
    ds = load_dataset(cfg.dataset)
    out = runs_root() / ds.name / cfg.run_name()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"dataset": ds.name, "kind": cfg.kind, "settings": asdict(cfg),
                     "leak_prone": bool(cfg.kind == "pid" and cfg.use_preference)}
    release = release_codes(ds.users)
    if release is not None:
        summary["release_index"] = {"codebook_usage": codebook_usage(release, 256),
                                    "collisions": collision_stats(release)}

    if cfg.kind != "pid":
        table = build_table(ds.users, cfg.kind)
    else:
        sets = build_review_sets(ds, cfg.use_preference)
        summary["reviews"] = {"text_kind": sets.text_kind, **sets.notes}
        if sets.leak_prone:
            log.warning("LEAK-PRONE: the preference sentence was written from all of a user's "
                        "reviews, validation and test included")
        enc = load_encoder(cfg.encoder, cfg.max_length, cfg.encode_batch_size)
        # interaction texts and preference sentences are cached apart, so both variants
        # share the (large) first cache entry
        text_emb, s_text = embed_cached(enc, sets.texts[:sets.n_base], desc=f"{ds.name} reviews")
        id_emb, s_ids = embed_cached(enc, sets.reviewer_ids, desc=f"{ds.name} user IDs")
        summary["encoder"] = {"model": enc.name, "fingerprint": enc.fingerprint, "dim": enc.dim,
                              "reviews": s_text, "ids": s_ids}
        if sets.n_base < len(sets.texts):
            pref_emb, summary["encoder"]["preferences"] = embed_cached(
                enc, sets.texts[sets.n_base:], desc=f"{ds.name} preferences")
            text_emb = np.concatenate([text_emb, pref_emb])
        inp = Inputs.build(sets, text_emb, id_emb)
        model, attn, history = train(cfg, inp, ckpt_dir=out / "ckpt")
        codes, report = make_index(cfg, model, attn, inp)
        table = build_table(ds.users, "pid", codes)
        save_weights(out / "model.safetensors", model, attn, asdict(cfg))
        summary.update(report)
        summary["history_last"] = history[-1] if history else None
        summary["history_every_10"] = history[::10]

    write_table(table, out)
    summary["users"] = int(len(table))
    summary["seconds"] = round(time.time() - t0, 1)
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1)))
    log.info("wrote %s", out)
    return summary


def describe(s: dict) -> str:
    lines = [f"{s['dataset']} [{s['kind']}]{'  LEAK-PRONE (uses GPT-3.5 preference)' if s['leak_prone'] else ''}"
             f": {s['users']:,} users"]
    if s["kind"] == "pid":
        c = s["collisions"]
        lines.append(f"  recon loss {s['recon_loss']:.6f}   rq loss {s['rq_loss']:.6f}")
        lines.append(f"  collisions: before {c['before']['colliding_users']} users in "
                     f"{c['before']['groups']} groups; after {len(c['rounds'])} Sinkhorn rounds "
                     f"{c['after_sinkhorn']['colliding_users']}; fallback moved "
                     f"{c['fallback_moved']}; after {c['after']['colliding_users']}")
        for name, usage in (("ours (final)", s["codebook_usage"]),
                            ("ours (greedy)", s["codebook_usage_greedy"])):
            lines.append(f"  codebook usage {name}: " + "  ".join(
                f"{u['level']} {u['used']}/{u['of']} (ppl {u['perplexity']})" for u in usage))
    if "release_index" in s:
        r = s["release_index"]
        lines.append("  codebook usage authors' release: " + "  ".join(
            f"{u['level']} {u['used']}/{u['of']} (ppl {u['perplexity']})" for u in r["codebook_usage"])
            + f"; collisions {r['collisions']['colliding_users']}")
    return "\n".join(lines)
