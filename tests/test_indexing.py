"""Personalised user indexing: eq. 1, RQ residuals, Sinkhorn, collisions, leakage, table."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ulmrec.indexing import (CollisionError, ReviewAttention, batch_reviews, build_review_sets,
                             build_table, collision_stats, index_vocab, resolve_collisions,
                             sinkhorn)
from ulmrec.indexing.collisions import sinkhorn_assign
from ulmrec.indexing.rqvae import ResidualQuantizer
from ulmrec.indexing.table import parse_token_string, token_string

TINY = ["--epochs", "8", "--codebook-size", "32", "--levels", "3", "--e-dim", "8",
        "--hidden", "64", "--batch-size", "256", "--kmeans-iters", "10"]


def test_eq1_attention_on_a_hand_example():
    attn = ReviewAttention(2)  # A = I
    reviews = torch.tensor([[1.0, 0.0], [0.0, 1.0],     # user 0: two reviews
                            [0.6, 0.8]])                 # user 1: one review
    owner = torch.tensor([0, 0, 1])
    e_o = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x, alpha = attn(reviews, owner, e_o)
    # user 0: scores e_wᵀ I e_o = 1 and 0 → α = (e/(e+1), 1/(e+1))
    a = math.e / (math.e + 1)
    assert alpha.tolist() == pytest.approx([a, 1 - a, 1.0], abs=1e-6)
    assert x[0].tolist() == pytest.approx([a, 1 - a], abs=1e-6)
    assert x[1].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)  # a single review: α = 1
    # a non-identity A changes the weights as e_wᵀ A e_o says: A swaps the axes
    attn.A.data = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    x, alpha = attn(reviews, owner, e_o)
    b = 1 / (1 + math.exp(2))  # scores 0 and 2
    assert alpha[:2].tolist() == pytest.approx([b, 1 - b], abs=1e-6)


def test_batch_reviews_gathers_each_users_own_reviews():
    offsets = torch.tensor([0, 2, 3, 7])
    text_ids = torch.tensor([5, 6, 7, 8, 9, 10, 11])
    tid, owner = batch_reviews(offsets, text_ids, torch.tensor([2, 0]))
    assert tid.tolist() == [8, 9, 10, 11, 5, 6]
    assert owner.tolist() == [0, 0, 0, 0, 1, 1]


def test_rq_residuals_reconstruct_the_input():
    torch.manual_seed(0)
    z = torch.randn(300, 8)
    rq = ResidualQuantizer(levels=3, size=16, dim=8, beta=0.25)
    rq.kmeans_init(z, iters=10, seed=0)
    z_q, codes, residuals, loss = rq(z)
    chosen = sum(rq.codebooks[lv][codes[:, lv]] for lv in range(3))      # Σ v_{d_i}
    assert torch.allclose(chosen + residuals[:, -1], z, atol=1e-5)
    assert torch.allclose(z_q, chosen, atol=1e-5)                        # decoder input = ẑ
    for lv in range(3):  # eq. 2: each code is the nearest codeword to that level's residual
        brute = torch.cdist(residuals[:, lv], rq.codebooks[lv]).argmin(-1)
        assert torch.equal(codes[:, lv], brute)
    # quantising explains more and more of z, level by level
    norms = residuals.norm(dim=-1).mean(0)
    assert all(norms[i + 1] < norms[i] for i in range(3))
    assert loss.item() > 0


def test_sinkhorn_spreads_a_crowd_uniformly_over_codes():
    torch.manual_seed(0)
    codebook = torch.randn(16, 4)
    points = codebook[0] + 0.05 * torch.randn(64, 4)   # all nearest to code 0
    d = torch.cdist(points, codebook) ** 2
    assert (d.argmin(-1) == 0).all()                   # greedy: one crowded code
    plan = sinkhorn(d, eps=0.003, iters=200)
    assert plan.sum(1).tolist() == pytest.approx([1.0] * 64, abs=1e-3)
    assert plan.sum(0).tolist() == pytest.approx([4.0] * 16, abs=1e-2)
    counts = torch.bincount(sinkhorn_assign(d, 0.003, 200), minlength=16)
    assert counts.max() <= 6 and (counts > 0).sum() >= 14


def test_collisions_resolved_and_identical_users_need_the_fallback():
    torch.manual_seed(0)
    codebook = torch.randn(16, 4)
    codes = np.array([[1, 2, 3]] * 5 + [[1, 2, 4], [0, 0, 0]])
    residual = torch.randn(7, 4)
    fixed, rep = resolve_collisions(codes, residual, codebook, fallback=False)
    assert rep["before"]["colliding_users"] == 5 and rep["after"]["colliding_users"] == 0
    assert collision_stats(fixed)["groups"] == 0
    assert (fixed[:, :2] == codes[:, :2]).all()          # only the last level moves
    assert (fixed[5:] == codes[5:]).all()                # non-colliding users keep their code
    same = residual.clone()
    same[1:5] = same[0]                                  # identical residuals: Sinkhorn can't split
    with pytest.raises(CollisionError):
        resolve_collisions(codes, same, codebook, fallback=False)
    fixed, rep = resolve_collisions(codes, same, codebook, fallback=True)
    assert rep["fallback_moved"] >= 1 and collision_stats(fixed)["groups"] == 0


def test_no_validation_or_test_review_reaches_the_encoder(gift_cards):
    inter = gift_cards.interactions.copy()
    held_out = inter["split"] != "train"
    inter.loc[held_out, "text"] = [f"HELD-OUT REVIEW {i}" for i in range(held_out.sum())]
    ds = type(gift_cards)(gift_cards.name, gift_cards.users, gift_cards.items, inter,
                          gift_cards.info)
    sets = build_review_sets(ds)
    assert not any(t.startswith("HELD-OUT") for t in sets.texts)
    # and every user's set is exactly their training texts, in order
    train = inter[~held_out].sort_values(["user", "position"]).groupby("user")["text"].agg(list)
    for row in (0, 17, len(sets.users) - 1):
        assert sets.user_texts(row) == train[sets.users[row]]


def _hashing_encoder(record):
    """A cheap real text featuriser standing in for MiniLM; records what it was given."""
    from sklearn.feature_extraction.text import HashingVectorizer
    vec = HashingVectorizer(n_features=96, analyzer="char_wb", ngram_range=(2, 4), norm="l2")

    class Enc:
        name, fingerprint, dim = "hashing", "hashing", 96

    def embed(enc, texts, desc="", **kw):
        record.extend(texts)
        return vec.transform(texts).toarray().astype(np.float32), {"texts": len(texts)}
    return (lambda *a, **k: Enc()), embed


def test_gift_cards_tiny_pipeline_has_zero_collisions(gift_cards, tmp_path, monkeypatch):
    import train.index as cli
    import ulmrec.indexing.build as build
    seen: list[str] = []
    load, embed = _hashing_encoder(seen)
    monkeypatch.setattr(build, "load_encoder", load)
    monkeypatch.setattr(build, "embed_cached", embed)
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    assert cli.main(["--dataset", "gift-cards", *TINY]) == 0
    out = tmp_path / "gift-cards" / "index"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["collisions"]["after"]["colliding_users"] == 0
    assert summary["leak_prone"] is False
    assert len(summary["codebook_usage"]) == 3
    table = pd.read_parquet(out / "user_index.parquet")
    assert len(table) == gift_cards.num_users and table["index"].is_unique
    assert (table["index"] == [token_string(r) for r in table[["a", "b", "c"]].to_numpy()]).all()
    assert json.loads((out / "user_index.json").read_text())[0]["index"] == table["index"][0]
    assert (out / "model.safetensors").exists()
    # only training texts and the users' IDs were encoded
    held = set(gift_cards.interactions.query("split != 'train'")["text"]) - \
        set(gift_cards.interactions.query("split == 'train'")["text"])
    assert held and not held & set(seen)
    assert set(gift_cards.users["reviewerID"]) <= set(seen)


def test_preference_variant_needs_the_release_split(gift_cards):
    with pytest.raises(ValueError, match="preference"):
        build_review_sets(gift_cards, use_preference=True)


def test_vocab_and_alternative_index_kinds(gift_cards):
    vocab = index_vocab()
    assert len(vocab) == 1024 == len(set(vocab))
    assert vocab[0] == "<a_0>" and vocab[255] == "<a_255>" and vocab[-1] == "<d_255>"
    assert parse_token_string("<a_195> <b_84> <c_110> <d_64>") == [195, 84, 110, 64]
    with pytest.raises(ValueError):
        parse_token_string("<b_1><a_2>")
    nid = build_table(gift_cards.users, "nid")
    oid = build_table(gift_cards.users, "oid")
    assert nid["index"].tolist()[:2] == ["1", "2"]
    assert oid["index"].tolist() == gift_cards.users.sort_values("user")["reviewerID"].tolist()
    with pytest.raises(ValueError):
        build_table(gift_cards.users, "pid", np.zeros((gift_cards.num_users, 4), int))  # all same


def test_real_encoder_mean_pooled_unit_vectors_and_cache(tmp_path):
    from ulmrec.indexing.encoder import embed_cached, load_encoder
    enc = load_encoder(None, max_length=32, batch_size=4)
    texts = ["Great gift card, fast delivery.", "Fast delivery and a great gift card!",
             "The mascara smudges badly.", "A"]
    emb, stats = embed_cached(enc, texts, cache_dir=tmp_path)
    assert emb.shape == (4, 384) and not stats["cached"]
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2                  # paraphrases closer than unrelated
    again, stats = embed_cached(enc, texts, cache_dir=tmp_path)
    assert stats["cached"] and np.array_equal(emb, again)
