"""LC-Rec: collision-free item index, the prefix trie, constrained generation, task leakage."""
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from ulmrec.data import load_dataset
from ulmrec.indexing.fit import IndexConfig
from ulmrec.indexing.table import index_vocab, token_string
from ulmrec.lcrec.generate import generate_topn, recommend
from ulmrec.lcrec.item_index import build_item_index, index_strings, item_texts
from ulmrec.lcrec.tasks import eval_examples, lcrec_data, seq_example, training_examples
from ulmrec.lcrec.trie import allowed, build_trie, item_token_ids, prefix_counts
from ulmrec.model import add_index_tokens
from ulmrec.ranker import RankerConfig, load_base


@pytest.fixture(scope="module")
def gift():
    return load_dataset("gift-cards")


@pytest.fixture(scope="module")
def item_table(gift):
    """The real item index of gift-cards: MiniLM text embeddings, 4 × 256 × 32, few epochs."""
    from ulmrec.indexing.encoder import embed_cached, load_encoder
    torch.set_num_threads(1)
    items, texts = item_texts(gift)
    emb, _ = embed_cached(load_encoder(), texts, desc="gift-cards items")
    table, report = build_item_index(items, emb, IndexConfig(epochs=15, kmeans_iters=10))
    return table, report


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with the real tokenizer and the 1,024 index tokens."""
    model, tok = load_base(RankerConfig(tiny_backbone=True))
    add_index_tokens(model, tok, index_vocab())
    return model.eval(), tok


def test_item_index_has_no_collisions_on_gift_cards(gift, item_table):
    table, report = item_table
    assert len(table) == gift.num_items and table["item"].is_unique
    assert table["index"].is_unique                                  # one index per item
    assert report["collisions"]["after"]["colliding_users"] == 0
    assert report["collisions"]["before"]["colliding_users"] > 0       # the mapping did work
    assert table["index"].str.fullmatch(r"(<[a-d]_\d{1,3}>){4}").all()
    _, texts = item_texts(gift)                                        # title + description
    assert any(". " in t and len(t) > 100 for t in texts)


def test_trie_allows_only_valid_continuations():
    rng = random.Random(0)
    seqs = {tuple(rng.randrange(3) for _ in range(4)) for _ in range(30)}
    trie = build_trie(seqs)
    for depth in range(5):
        for prefix in {s[:depth] for s in seqs}:
            nxt = allowed(trie, prefix)
            want = sorted({s[depth] for s in seqs if s[:depth] == prefix}) if depth < 4 else []
            assert nxt == want                       # exactly the tokens that reach an item
    assert allowed(trie, (9,)) == []                 # a prefix no item has: nothing follows
    # banning items prunes every branch that holds nothing else, at every level
    full = min(seqs)
    under = [s for s in seqs if s[:1] == full[:1]]
    assert full[-1] not in allowed(trie, full[:-1], banned=prefix_counts([full]))
    assert full[0] not in allowed(trie, (), banned=prefix_counts(under))
    assert full[0] in allowed(trie, (), banned=prefix_counts(under[1:])) or len(under) == 1


def _random_items(rng, n, tok):
    """n distinct random indices over a few codes per level (many shared prefixes)."""
    codes = set()
    while len(codes) < n:
        codes.add(tuple(rng.randrange(k) for k in (3, 4, 6, 256)))
    table = pd.DataFrame({"item": np.arange(1, n + 1), "index": [token_string(c) for c in sorted(codes)]})
    return table, item_token_ids(tok, table)


def test_constrained_beams_never_form_a_missing_item(tiny):
    """Property: whatever the model prefers, every beam spells an existing item."""
    model, tok = tiny
    emb = model.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(index_vocab())
    saved = emb.data[new].clone()
    rng = random.Random(1)
    try:
        for trial in range(10):
            torch.manual_seed(trial)    # new random preferences over the index tokens each time
            emb.data[new] = torch.randn_like(saved) * 3
            table, token_items = _random_items(rng, rng.choice([25, 60, 150]), tok)
            trie = build_trie(token_items)
            items = table["item"].tolist()
            exs = [seq_example(_data(table), u, rng.sample(items, 3), None, 20) for u in range(3)]
            banned = [rng.sample(items, 5) for _ in exs]
            top, stats = generate_topn(model, tok, exs, token_items, n=20, beams=20,
                                       banned_items=banned, fmt="alpaca", trie=trie)
            for got, ban in zip(top, banned):
                assert got and len({i for i, _ in got}) == len(got)
                assert set(i for i, _ in got) <= set(items) and not set(i for i, _ in got) & set(ban)
                assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
            assert stats["invalid_beams"] == 0       # raw beams too: none formed a missing item
    finally:
        emb.data[new] = saved


def _data(table):
    from ulmrec.lcrec.tasks import LcRecData
    return LcRecData(index=index_strings(table), titles={}, texts={}, train=None)


def test_tasks_leak_no_val_or_test_item(gift, item_table):
    table, _ = item_table
    data = lcrec_data(gift, index_strings(table))
    exs = training_examples(data, tasks=("seq", "mut", "asy"), max_history=20)
    assert {e.task for e in exs} == {"seq", "mut", "asy"}
    held = {int(u): (int(gift.targets("val")[u]), int(gift.targets("test")[u]))
            for u in gift.targets("test").index}
    for e in exs:
        if e.user < 0:  # item-side alignment: no user, no held-out information
            continue
        assert e.target is None or e.target not in held[e.user]
        shown = e.instruction + e.response
        own = [data.titles[i] for i in data.train[e.user]]
        for item in held[e.user]:
            assert data.index[item] not in shown      # indices are unique: an exact check
            # titles are not unique on gift-cards: one may appear inside a training title
            assert data.titles[item] not in shown or any(data.titles[item] in t for t in own)
    test, hist = eval_examples(gift, data, "test", users=[1, 2])
    assert [e.target for e in test] == [int(gift.targets("test")[u]) for u in (1, 2)]
    assert hist[0] == [int(i) for i in gift.sequences("val")[1]]     # train + val history


def test_recommend_returns_valid_unseen_items(tiny, item_table, gift):
    model, tok = tiny
    table, _ = item_table
    history = [int(i) for i in gift.sequences("val")[1]]
    out = recommend(model, tok, history, table, n=5, beams=8)
    assert len(out) == 5
    index = index_strings(table)
    for item, s, score in out:
        assert index[item] == s and item not in history and np.isfinite(score)


def test_train_lcrec_end_to_end_then_skips_done_stages(tmp_path, monkeypatch):
    from train import lcrec
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    common = ["--dataset", "gift-cards", "--tiny-backbone", "--index-epochs", "5",
              "--max-steps", "3", "--batch-size", "2", "--eval-users", "4", "--beams", "6",
              "--topn", "5", "--prompt-format", "alpaca", "--max-history", "5",
              "--preference-source", "none", "--ckpt-every", "2"]
    assert lcrec.main(common + ["--stages", "index", "finetune"]) == 0
    run = tmp_path / "gift-cards" / "lcrec"
    assert json.loads((run / "finetune" / "checkpoint" / "state.json").read_text())["done"]
    assert lcrec.main(common + ["--stages", "evaluate"]) == 0
    result = json.loads((run / "eval" / "metrics_test.json").read_text())
    assert result["users"] == 4 and result["all_generated_items_valid"]
    assert set(result["metrics"]) == {"HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10"}
    ref = result["reference"]                     # same users, popularity; no LRURec run here
    assert set(ref["popularity (training counts)"]) == set(result["metrics"])
    assert "retriever reference skipped" in ref["notes"][0]
    summary = json.loads((run / "index" / "summary.json").read_text())
    assert summary["collisions"]["after"]["colliding_users"] == 0
    # a rerun finds every stage done and changes nothing
    stamp = (run / "finetune" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert lcrec.main(common) == 0
    assert (run / "finetune" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((run / "eval" / "metrics_test.json").read_text()) == result


def test_interrupted_finetune_resumes_exactly(tmp_path, monkeypatch):
    from train import lcrec
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    common = ["--dataset", "gift-cards", "--tiny-backbone", "--index-epochs", "3",
              "--max-steps", "4", "--batch-size", "2", "--ckpt-every", "100", "--lora-dropout", "0",
              "--prompt-format", "alpaca", "--max-history", "4", "--preference-source", "none",
              "--stages", "index", "finetune", "--learning-rate", "0.01"]
    assert lcrec.main(common + ["--tag", "full"]) == 0
    assert lcrec.main(common + ["--tag", "cut", "--stop-after", "2"]) == 0
    cut = tmp_path / "gift-cards" / "lcrec" / "cut" / "finetune"
    state = json.loads((cut / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2 and not state["done"] and not (cut / "adapter").exists()
    assert (cut / "checkpoint" / "trainable.safetensors").stat().st_size < 2_000_000  # no embedding copy
    assert lcrec.main(common + ["--tag", "cut"]) == 0
    full = tmp_path / "gift-cards" / "lcrec" / "full" / "finetune"
    losses = [json.loads((d / "checkpoint" / "state.json").read_text())["losses"] for d in (full, cut)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)


def test_llm_item_embedding_is_mean_pooled_and_unit_length(tiny):
    from ulmrec.lcrec.item_index import llm_embed
    model, tok = tiny
    emb = llm_embed(model, tok, ["a short title", "a much longer title with more words in it", "x"],
                    batch_size=2)
    assert emb.shape == (3, model.config.hidden_size)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    alone = llm_embed(model, tok, ["a short title"])    # padding does not change the vector
    assert np.allclose(alone[0], emb[0], atol=1e-4)


def test_the_stage_config_composes_index_and_ranker_configs(tmp_path):
    """LcRecConfig holds an IndexConfig and a RankerConfig: their fields are flat flags and
    YAML keys (--index-*, --lora-r, …), a saved config is flat and reads back equal, and the
    stage's own dataset / seed / threads reach both."""
    from ulmrec.config import flat_dict, from_dict, parse_config
    from ulmrec.lcrec.run import LcRecConfig
    yaml_file = tmp_path / "lc.yaml"
    yaml_file.write_text("lcrec:\n  index_epochs: 7\n  max_len: 256\n  prompt_format: alpaca\n")
    cfg = parse_config(LcRecConfig, ["--config", str(yaml_file), "--dataset", "games", "--lora-r", "16",
                                     "--index-epochs", "9", "--index-levels", "3", "--seed", "5",
                                     "--lora-targets", "q_proj", "k_proj"], section="lcrec")
    assert isinstance(cfg.index, IndexConfig) and isinstance(cfg.llm, RankerConfig)
    assert (cfg.index.epochs, cfg.index.levels, cfg.index.out) == (9, 3, "lcrec")   # the flag wins
    assert (cfg.llm.lora_r, cfg.llm.max_len, cfg.llm.prompt_format) == (16, 256, "alpaca")
    assert cfg.llm.lora_targets == ("q_proj", "k_proj")
    icfg, rcfg = cfg.index_config(), cfg.ranker_config()
    assert (icfg.dataset, icfg.seed, rcfg.dataset) == ("games", 5, "games")
    saved = json.loads(json.dumps(flat_dict(cfg)))
    assert saved["index_levels"] == 3 and saved["lora_r"] == 16 and "index" not in saved
    assert from_dict(LcRecConfig, saved) == cfg
    assert from_dict(RankerConfig, saved, known_only=True).lora_targets == ("q_proj", "k_proj")
    assert from_dict(LcRecConfig, {"index": {"lr": 0.01}}).index.lr == 0.01   # a nested mapping
    assert LcRecConfig().llm.max_len == 512 and LcRecConfig().index.out == "lcrec"
    with pytest.raises(ValueError, match="index_beta"):
        from_dict(LcRecConfig, {"index_beta": 0.5})          # not a field the stage exposes
