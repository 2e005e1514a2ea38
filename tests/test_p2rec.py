"""P2Rec on real gift-cards data with a tiny random Llama: targets, shapes, gate, SFT, agreement."""
import json

import numpy as np
import pytest
import torch

from ulmrec.p2rec import (GatedItemTable, GroupItemTable, P2RecLM, add_lora, agreement,
                          build_variant, enhance_items, frequency_vectors, instance_examples,
                          kmeans_groups, sft_loss, train_sft, user_targets)
from ulmrec.p2rec.sft import mean_loss
from ulmrec.retrieval import LRURec, RetrievalConfig

K = 4


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from ulmrec.backbone import resolve_backbone
    return AutoTokenizer.from_pretrained(resolve_backbone())


def make_lm(tok, num_items, d=16, k=K, lora=True):
    """A tiny random Llama (the project's test backbone) + projection + head."""
    from ulmrec.ranker import _tiny_llama
    llm = _tiny_llama(tok)                                                 # seeded: same each time
    table = torch.randn(num_items + 1, d)
    return P2RecLM(add_lora(llm) if lora else llm, tok, table, k)


def test_frequency_vectors_normalise_counts():
    groups = np.array([-1, 0, 0, 1, 2])                                   # item 0 = padding
    got = frequency_vectors([[1, 2, 3], [4, 4], [3]], groups, 3)
    np.testing.assert_allclose(got, [[2 / 3, 1 / 3, 0], [0, 0, 1], [0, 1, 0]], rtol=1e-6)


def test_targets_use_training_items_only(gift_cards):
    ds = gift_cards
    groups = np.concatenate([[-1], np.arange(ds.num_items) % K])
    users, hist, targets = user_targets(ds, groups, K)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    inter = ds.interactions
    for u, h, t in list(zip(users, hist, targets))[:50]:
        train = inter[(inter.user == u) & (inter.split == "train")].sort_values("position")["item"]
        assert h == list(train)
        np.testing.assert_allclose(t, np.bincount(groups[train], minlength=K) / len(train), rtol=1e-6)
    # moving the held-out items to a group of their own changes no target
    held = inter[inter.split.isin(["val", "test"])]["item"].unique()
    only_held = np.setdiff1d(held, inter[inter.split == "train"]["item"].unique())
    g2 = groups.copy()
    g2[only_held] = K - 1
    np.testing.assert_array_equal(user_targets(ds, g2, K)[2], targets)


def test_kmeans_groups_cover_items():
    emb = torch.cat([torch.zeros(1, 8), torch.randn(40, 8) + torch.arange(40)[:, None] % 4 * 10])
    g = kmeans_groups(emb, 4, seed=0)
    assert g.shape == (41,) and g[0] == -1 and set(g[1:]) == {0, 1, 2, 3}
    assert len({tuple(np.flatnonzero(g == c) % 4) for c in range(4)}) == 4   # the 4 planted blobs


def test_instance_examples_one_per_prefix():
    groups = np.array([-1, 0, 1, 2])
    hist, y = instance_examples([[1, 2, 3], [3, 1]], groups, 3)
    assert hist == [[1], [1, 2], [3]]
    np.testing.assert_array_equal(y.argmax(1), [1, 2, 0])


def test_projection_shapes_and_padding(tok):
    model = make_lm(tok, 30).eval()
    D = model.llm.get_input_embeddings().weight.shape[1]
    P, S = len(model.prefix_ids), len(model.suffix_ids)
    hists = [[1, 2, 3, 4, 5], [7]]
    x, mask = model.embed(hists)
    assert x.shape == (2, P + 5 + S, D) and mask.sum(1).tolist() == [P + 5 + S, P + 1 + S]
    # the projected item sits right after the instruction, in the LLM's width
    torch.testing.assert_close(x[1, -S - 1], model.proj(model.items[7]))
    h, probs = model(hists)
    assert h.shape == (2, D) and probs.shape == (2, K)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    # left padding and position ids: a row gives the same output alone or in a batch
    with torch.no_grad():
        torch.testing.assert_close(model([[7]])[0], model(hists)[0][1:], rtol=1e-4, atol=1e-4)


def test_sft_loss_decreases_and_resumes(tok, gift_cards, tmp_path):
    groups = np.concatenate([[-1], np.arange(gift_cards.num_items) % K])
    _, hist, targets = user_targets(gift_cards, groups, K)
    hist, targets = hist[:64], targets[:64]
    model = make_lm(tok, gift_cards.num_items)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and {"proj.weight", "head.weight"} <= trainable
    assert not any("lora_" not in n and n.startswith("llm.") for n in trainable)  # backbone frozen
    before = mean_loss(model, hist, targets)
    # interrupted after 2 of 4 epochs (4 steps of 16 each), then resumed from the checkpoint
    first = train_sft(model, hist, targets, epochs=4, lr=3e-3, batch_size=16, seed=0, out=tmp_path,
                      stop_after=8)
    assert not first["finished"] and [h["epoch"] for h in first["history"]] == [1, 2]
    state = train_sft(model, hist, targets, epochs=4, lr=3e-3, batch_size=16, seed=0, out=tmp_path)
    assert state["finished"] and [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    assert [h["loss"] for h in state["history"][:2]] == [h["loss"] for h in first["history"]]
    assert state["history"][0]["seconds"] is None and state["history"][3]["seconds"] > 0
    assert mean_loss(model, hist, targets) < before * 0.8
    # a finished run called again trains nothing and still reports its epochs
    again = train_sft(model, hist, targets, epochs=4, lr=3e-3, batch_size=16, seed=0, out=tmp_path)
    assert again["finished"] and [h["loss"] for h in again["history"]] == \
        [h["loss"] for h in state["history"]]


def test_sft_loss_is_eq4():
    pred, y = torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sft_loss(pred, y).item() == pytest.approx(0.25)                # (0.25 + 0.25 + 0) / 2


def test_enhance_items_one_item_prompts(tok):
    model = make_lm(tok, 10, lora=False)
    emb, probs = enhance_items(model, 10, batch_size=4)
    assert emb.shape == (11, model.llm.config.hidden_size) and probs.shape == (11, K)
    assert emb[0].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(emb[7], model([[7]])[0][0], rtol=1e-4, atol=1e-4)


def test_agreement_cases():
    groups = np.array([-1, 0, 1, 2, 3])
    probs = np.array([[0, 0, 0, 0],
                      [.7, .1, .1, .1],          # top-1 = 0 = pre-group → C1
                      [.5, .3, .1, .1],          # pre-group 1 is second → C2
                      [.4, .3, .2, .1],          # pre-group 2 is third → C2
                      [.4, .3, .2, .1]])         # pre-group 3 is fourth → C3
    a = agreement(groups, probs)
    assert (a["items"], a["C1"], a["C2"], a["C3"]) == (4, 0.25, 0.5, pytest.approx(0.25))


def test_gate_mixes_own_and_enhanced():
    torch.manual_seed(0)
    own = torch.nn.Embedding(6, 8)
    enhanced = torch.randn(6, 20) * 50 + 3                                # LLM-scale values
    table = GatedItemTable(own, enhanced)
    w = table.weight
    assert w.shape == (6, 8)
    assert table.enhanced[1:].mean().abs() < 1e-4                         # standardised
    with torch.no_grad():
        table.gate.weight.zero_()                                         # g = σ(0) = 1/2
    k = table.proj(table.enhanced)
    torch.testing.assert_close(table.weight, 0.5 * own.weight + 0.5 * k)
    torch.testing.assert_close(table(torch.tensor([[3, 0]])), table.weight[[3, 0]][None])
    table.weight.sum().backward()
    assert own.weight.grad is not None and table.proj.weight.grad is not None
    assert not table.enhanced.requires_grad                               # LLM knowledge is frozen


def test_variants_share_base_weights_and_use_table(gift_cards):
    cfg = RetrievalConfig(hidden=16, seed=3)
    n = gift_cards.num_items
    groups = np.concatenate([[-1], np.arange(n) % K])
    base = build_variant(cfg, n, "base")
    ci = build_variant(cfg, n, "ci", groups=groups, k=K)
    p2 = build_variant(cfg, n, "p2rec", enhanced=torch.randn(n + 1, 32))
    assert isinstance(ci.item_emb, GroupItemTable) and isinstance(p2.item_emb, GatedItemTable)
    torch.testing.assert_close(p2.item_emb.own.weight, base.item_emb.weight)
    torch.testing.assert_close(ci.lrus[0].in_proj.weight, base.lrus[0].in_proj.weight)
    # CI: items of one group share one offset
    same = np.flatnonzero(groups == 1)[:2]
    off = ci.item_emb.weight - ci.item_emb.own.weight
    torch.testing.assert_close(off[same[0]], off[same[1]])
    # the fused table drives both the input lookup and the tied output scores
    x = torch.tensor([[0, 1, 2, 3]])
    p2.eval()
    s1 = p2.score(p2.encode(x)[:, -1])
    with torch.no_grad():
        p2.item_emb.proj.weight.mul_(10)
    assert isinstance(p2, LRURec) and s1.shape == (1, n + 1)
    assert not torch.allclose(s1, p2.score(p2.encode(x)[:, -1]))


def test_cli_end_to_end_tiny(gift_cards, tmp_path, monkeypatch):
    from train import p2rec
    from ulmrec.retrieval import run
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    run(RetrievalConfig(hidden=16, max_epochs=1, threads=1))
    args = ["--tiny-backbone", "--k", "4", "--sft-epochs", "1", "--timing-examples", "8",
            "--models", "lrurec", "--variants", "base", "ci", "p2rec", "--max-epochs", "2",
            "--hidden", "16", "--threads", "1", "--export-retriever"]
    assert p2rec.main(args) == 0
    out = tmp_path / "gift-cards" / "p2rec"
    sft = json.loads((out / "sft" / "sft.json").read_text())
    assert sft["cost"]["user_level_examples"] == 453
    assert sft["cost"]["instance_level_examples"] > 3 * 453
    agree = json.loads((out / "agreement.json").read_text())
    assert agree["C1"] + agree["C2"] + agree["C3"] == pytest.approx(1.0)
    assert "+P2Rec" in (out / "table.md").read_text()
    stamp = (out / "fusion" / "lrurec-p2rec-s0" / "metrics.json").stat().st_mtime
    assert p2rec.main(args) == 0                                          # rerun: all stages cached
    assert (out / "fusion" / "lrurec-p2rec-s0" / "metrics.json").stat().st_mtime == stamp
    # --sft-users: SFT (and its cost report) on a random subset; the later stages still run
    assert p2rec.main(args + ["--sft-users", "100", "--stages", "group", "sft"]) == 0
    sft = json.loads((out / "sft" / "sft.json").read_text())
    assert sft["users"] == sft["cost"]["user_level_examples"] == 100 and sft["sft_users_of"] == 453
    # the export puts the candidates where the ranker reads a retriever's (--retriever lrurec-p2rec)
    from types import SimpleNamespace

    from ulmrec.ranker import load_candidates
    cfg = p2rec.parse_config(p2rec.P2RecConfig, args)
    p2rec.export_retriever(cfg, "lrurec", out / "fusion" / "lrurec-p2rec-s0")
    test = load_candidates(gift_cards, SimpleNamespace(retriever="lrurec-p2rec"), "test")
    assert len(test) == 453 and len(test["candidates"].iloc[0]) == 20
