"""Retrieval stage on real gift-cards data with tiny models (a few seconds of training)."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from ulmrec.retrieval import LRURec, RetrievalConfig, SASRec, lru_loop, lru_scan, run
from ulmrec.retrieval.data import batch_order, collate, eval_histories, pad_left, train_windows
from ulmrec.retrieval.trainer import build_model

TINY = dict(dataset="gift-cards", hidden=16, blocks=2, heads=2, batch_size=64, max_epochs=3,
            patience=10, threads=1)


def real_batch(ds, n=24, max_len=50):
    hist = list(ds.sequences("train"))[:n]
    return pad_left([h[-max_len:] for h in hist]), hist


@pytest.mark.parametrize("L", [1, 2, 5, 16, 37, 64])
def test_parallel_scan_equals_step_by_step_recurrence(L):
    g = torch.Generator().manual_seed(L)
    n = 8
    # |λ| in the ring plus a few extreme values, arbitrary phases
    log_lambda = torch.complex(-torch.rand(n, generator=g) * 0.3, torch.rand(n, generator=g) * 6.28)
    u = torch.complex(torch.randn(3, L, n, generator=g), torch.randn(3, L, n, generator=g))
    torch.testing.assert_close(lru_scan(log_lambda, u), lru_loop(log_lambda, u), rtol=1e-4, atol=1e-4)


def test_lru_model_scan_equals_loop_on_real_histories(gift_cards):
    torch.manual_seed(0)
    model = LRURec(gift_cards.num_items, hidden=16).eval()
    x, _ = real_batch(gift_cards)
    with torch.no_grad():
        fast = model.encode(x)
        for layer in model.lrus:
            layer.scan = lru_loop
        slow = model.encode(x)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


def test_ring_initialisation(gift_cards):
    torch.manual_seed(0)
    layer = LRURec(gift_cards.num_items, hidden=64).lrus[0]
    mod = torch.exp(layer.log_lambda()).abs()
    assert mod.min() >= 0.8 - 1e-6 and mod.max() <= 0.99 + 1e-6
    gamma = torch.exp(layer.gamma_log)
    torch.testing.assert_close(gamma, torch.sqrt(1 - mod ** 2))


@pytest.mark.parametrize("cls", [LRURec, SASRec])
def test_padding_and_future_items_do_not_leak(gift_cards, cls):
    torch.manual_seed(0)
    model = cls(gift_cards.num_items, hidden=16).eval()
    x, hist = real_batch(gift_cards)
    with torch.no_grad():
        short = model.encode(x)[:, -1]
        long = model.encode(pad_left([h[-50:] for h in hist], length=x.size(1) + 13))[:, -1]
        torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-4)
        # changing the last item must not change any earlier position's state
        y = x.clone()
        y[:, -1] = (y[:, -1] % gift_cards.num_items) + 1
        a, b = model.encode(x), model.encode(y)
        torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a[:, -1], b[:, -1])


def test_training_windows_cover_each_train_target_once(gift_cards):
    seqs = list(gift_cards.sequences("train"))
    long_seq = list(range(1, 121))                                    # forces several windows
    windows = train_windows(seqs + [long_seq], max_len=50)
    assert all(2 <= len(w) <= 51 for w in windows)
    assert sum(len(w) - 1 for w in windows) == sum(len(s) - 1 for s in seqs) + 119
    assert sorted(t for w in windows[-3:] for t in w[1:]) == list(range(2, 121))
    # windows come from the train part only: no (user, val/test item) pair can appear
    held_out = gift_cards.interactions[gift_cards.interactions["split"] != "train"]
    by_user = dict(zip(gift_cards.sequences("train").index, seqs))
    for u, item in zip(held_out["user"], held_out["item"]):
        assert item not in train_windows([by_user[u]], 50)[0]


def test_batch_order_is_a_seeded_permutation():
    windows = [[1] * (i % 17 + 2) for i in range(1000)]
    a = batch_order(windows, 64, seed=1, epoch=0)
    assert sorted(j for b in a for j in b) == list(range(1000))
    assert a == batch_order(windows, 64, seed=1, epoch=0)
    assert a != batch_order(windows, 64, seed=1, epoch=1)
    inputs, targets = collate(windows, a[0])
    assert inputs.shape == targets.shape and torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, gift_cards):
    out = tmp_path_factory.mktemp("lrurec")
    cfg = RetrievalConfig(model="lrurec", out_dir=str(out), **TINY)
    return cfg, run(cfg), out


def test_metrics_file_written(trained):
    cfg, report, out = trained
    for name in ("model.safetensors", "model.json", "last.pt", "metrics.json", "candidates.parquet"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for k in (5, 10, 20):
            for m in ("Recall", "NDCG", "MRR"):
                assert 0.0 <= metrics[split][f"{m}@{k}"] <= 1.0
        assert metrics[split]["Recall@5"] <= metrics[split]["Recall@10"] <= metrics[split]["Recall@20"]
    assert len(metrics["history"]) == 3 and all(h["train_s"] > 0 for h in metrics["history"])
    assert metrics["history"][-1]["loss"] < metrics["history"][0]["loss"]
    assert "test_Recall@20" in metrics["ranker_ceiling"]


def test_candidates_exclude_history_and_match_metrics(trained, gift_cards):
    cfg, report, out = trained
    cands = pd.read_parquet(out / "candidates.parquet")
    assert set(cands["split"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        part = cands[cands["split"] == split].set_index("user")
        users, hist, targets = eval_histories(gift_cards, split)
        assert sorted(part.index) == sorted(users.tolist())
        for u, h, t in zip(users, hist, targets):
            row = part.loc[u]
            c = list(row["candidates"])
            assert len(c) == 20 and len(set(c)) == 20
            assert not set(c) & set(h), f"user {u}: history item among {split} candidates"
            if split == "train":      # the ranker's training lists never hold a later item
                later = set(gift_cards.sequences("test")[u][len(h) + 1:])
                assert not set(c) & later, f"user {u}: a val/test item among train candidates"
            assert 0 not in c and max(c) <= gift_cards.num_items
            s = np.asarray(row["scores"])
            assert np.all(np.isfinite(s)) and np.all(np.diff(s) <= 0)
            assert row["target"] == t and row["target_in_candidates"] == (t in c)
        m = report["train_fit" if split == "train" else split]
        assert part["target_in_candidates"].mean() == pytest.approx(m["candidates_Recall@20"])
        # full-ranking Recall@20 and the list's recall agree up to ties
        assert abs(m["Recall@20"] - m["candidates_Recall@20"]) < 0.01


def test_resume_after_interruption_continues_identically(trained, tmp_path):
    cfg, report, out = trained

    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, state):
        if epoch == 1:
            raise Interrupt

    cfg2 = replace(cfg, out_dir=str(tmp_path))
    with pytest.raises(Interrupt):
        run(cfg2, on_epoch_end=stop_after_first)
    assert (tmp_path / "last.pt").exists() and not (tmp_path / "metrics.json").exists()
    resumed = run(cfg2)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in e.items() if not k.endswith("_s")} for e in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(report["history"])
    assert resumed["test"] == report["test"]
    # a resume that would silently change the model is refused
    with pytest.raises(ValueError, match="other settings"):
        run(replace(cfg2, hidden=8))


def test_weight_average_is_what_is_validated_kept_and_resumed(tmp_path, gift_cards):
    class Interrupt(Exception):
        pass

    def stop_after_first(epoch, state):
        if epoch == 1:
            raise Interrupt

    cfg = RetrievalConfig(model="lrurec", ema_epochs=1.0, **{**TINY, "max_epochs": 2})
    whole = run(replace(cfg, out_dir=str(tmp_path / "whole")))
    with pytest.raises(Interrupt):
        run(replace(cfg, out_dir=str(tmp_path / "cut")), on_epoch_end=stop_after_first)
    last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    avg = {k.removeprefix("module."): v for k, v in last["average"].items() if k.startswith("module.")}
    saved = load_file(tmp_path / "cut" / "model.safetensors")     # epoch 1 is always the best so far
    assert saved.keys() == avg.keys() == last["model"].keys()
    assert all(torch.equal(saved[k], avg[k]) for k in saved)
    assert not all(torch.equal(saved[k], last["model"][k]) for k in saved), "raw weights were kept"
    resumed = run(replace(cfg, out_dir=str(tmp_path / "cut")))
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"] == whole["test"]
    with pytest.raises(ValueError, match="other settings"):      # the average cannot be switched off mid-run
        run(replace(cfg, out_dir=str(tmp_path / "cut"), ema_epochs=0.0, max_epochs=3))
    with pytest.raises(ValueError, match="ema_epochs"):
        run(replace(cfg, out_dir=str(tmp_path / "bad"), ema_epochs=-1.0))


def test_checkpoint_from_before_weight_averaging_resumes_only_without_it(tmp_path, gift_cards):
    cfg = RetrievalConfig(model="lrurec", ema_epochs=0.0, out_dir=str(tmp_path), **{**TINY, "max_epochs": 1})
    run(cfg)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    del ckpt["signature"]["ema_epochs"]                            # as written before the setting existed
    torch.save(ckpt, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="ema_epochs"):
        run(replace(cfg, ema_epochs=4.0, max_epochs=2))
    assert run(replace(cfg, max_epochs=2))["epochs_trained"] == 2


def test_sasrec_trains_and_exports(tmp_path, gift_cards):
    cfg = RetrievalConfig(model="sasrec", out_dir=str(tmp_path), **{**TINY, "max_epochs": 2})
    report = run(cfg)
    assert report["model"] == "sasrec" and report["epochs_trained"] == 2
    cands = pd.read_parquet(tmp_path / "candidates.parquet")
    n_train = int((gift_cards.sequences("train").map(len) >= 2).sum())
    assert len(cands) == 2 * gift_cards.num_users + n_train


def test_bad_input_is_reported(gift_cards):
    with pytest.raises(ValueError, match="unknown retriever"):
        build_model(RetrievalConfig(model="gru4rec"), gift_cards.num_items)
    with pytest.raises(ValueError, match="best_metric"):
        run(RetrievalConfig(best_metric="AUC"))
    with pytest.raises(ValueError, match="split"):
        eval_histories(gift_cards, "all")


def test_every_target_weighs_the_same_whatever_the_batching(gift_cards):
    """The epoch's gradient is a plain sum over targets: length-sorted pools (few targets in a
    batch of short windows) and random batches give the same total, target by target."""
    from ulmrec.retrieval.trainer import batch_loss, targets_per_batch
    torch.manual_seed(0)
    model = LRURec(gift_cards.num_items, hidden=16, dropout=0.0, attn_dropout=0.0)
    windows = train_windows(list(gift_cards.sequences("train")), 50)
    norm = targets_per_batch(windows, 64)
    grads, totals = [], []
    for pool in (1, 32):
        model.zero_grad()
        total = 0.0
        for idx in batch_order(windows, 64, seed=0, epoch=0, pool_batches=pool):
            loss, _ = batch_loss(model, windows, idx, norm, "cpu")
            loss.backward()
            total += loss.item()
        grads.append(model.item_emb.weight.grad.clone() if hasattr(model, "item_emb")
                     else next(model.parameters()).grad.clone())
        totals.append(total)
    assert totals[0] == pytest.approx(totals[1], rel=1e-4)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-6)
    # a target's weight is 1/norm: the epoch's loss sum is the per-target mean × targets / norm
    n_targets = sum(len(w) - 1 for w in windows)
    assert norm == pytest.approx(n_targets / -(-len(windows) // 64))


def test_seed_ensemble_scores_are_mean_log_probabilities(gift_cards):
    from ulmrec.retrieval.ensemble import ScoreEnsemble
    from ulmrec.retrieval.evaluate import full_rank
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(LRURec(gift_cards.num_items, hidden=16).eval())
    ens = ScoreEnsemble(models).eval()
    x, _ = real_batch(gift_cards)
    with torch.no_grad():
        got = ens.score(ens.encode(x)[:, -1])
        want = sum(m.score(m.encode(x)[:, -1]).log_softmax(-1) for m in models) / 2
    torch.testing.assert_close(got, want)
    users, hist, targets = eval_histories(gift_cards, "test")
    res = full_rank(ens, hist, targets, 50, k=20)
    assert res["items"].shape == (len(users), 20) and np.isfinite(res["ranks"]).all()
