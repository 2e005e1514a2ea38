"""Soft item tokens (ulmrec.item_tokens): the retriever's item embedding, projected, in place of
each <i_k> token; trained with the ranker, resumed from checkpoints, exported and served."""
import numpy as np
import pytest
import torch
from tiny_run import train_and_evaluate, train_tiny_retriever

from train import export, finetune
from ulmrec.bundle import load_bundle
from ulmrec.item_tokens import FILE, ItemTokens, item_token
from ulmrec.ranker import RankerConfig, build_ranker, load_ranker

ARGS = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "lrurec", "--index-kind", "none",
        "--tasks", "next_item", "--task-ratio", "1", "--preference-source", "extractive",
        "--max-history", "3", "--max-title-words", "4", "--max-len", "512"]


def _tiny(table_rows: int = 9, d: int = 5):
    model, tok = build_ranker(RankerConfig(tiny_backbone=True, index_tokens=False))
    torch.manual_seed(0)
    it = ItemTokens(torch.randn(table_rows, d), model.get_input_embeddings().weight.shape[1], len(tok))
    return model, tok, it.attach(model, tok)


def test_a_soft_token_reads_the_projected_retriever_embedding():
    model, tok, it = _tiny()
    ids = tok("a title " + item_token(3) + " and " + item_token(8), add_special_tokens=False)["input_ids"]
    assert it.first_id + 2 in ids and it.first_id + 7 in ids           # one token per item
    emb = model.get_input_embeddings()(torch.tensor([ids]))[0]          # [L, hidden]
    for item in (3, 8):
        pos = ids.index(it.first_id + item - 1)
        torch.testing.assert_close(emb[pos], it.proj(it.table[item]))
    plain = [i for i in ids if i < it.first_id]
    torch.testing.assert_close(model.get_input_embeddings()(torch.tensor([plain]))[0],
                               emb[[ids.index(i) for i in plain]])
    # the projection learns through the LLM's loss; the retriever's table stays frozen
    labels = torch.tensor([[i if i < it.first_id else -100 for i in ids]])  # never a soft token
    out = model(input_ids=torch.tensor([ids]), labels=labels)
    out.loss.backward()
    assert it.proj.weight.grad is not None and it.proj.weight.grad.abs().sum() > 0
    assert not it.table.requires_grad


def test_attach_refuses_ids_inside_the_embedding():
    model, tok = build_ranker(RankerConfig(tiny_backbone=True, index_tokens=False))
    with pytest.raises(ValueError, match="inside the model"):
        ItemTokens(torch.randn(4, 3), 64, len(tok) - 1).attach(model, tok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    mp = pytest.MonkeyPatch()
    mp.setenv("ULMREC_RUNS", str(root / "runs"))
    try:
        train_tiny_retriever()
        train_and_evaluate(ARGS + ["--item-tokens"], root / "results")
        assert export.main(["--dataset", "gift-cards", "--run-name", "t", "--results-dir",
                            str(root / "results"), "--out", str(root / "b"), "--no-include-data"]) == 0
        yield root
    finally:
        mp.undo()


def test_trained_soft_tokens_travel_with_the_adapter_and_the_bundle(trained):
    run = trained / "runs" / "gift-cards" / "finetune" / "t"
    assert (run / "best" / FILE).exists() and (trained / "b" / FILE).exists()
    saved = ItemTokens.load(run / "best")
    fresh = ItemTokens.from_retriever(trained / "runs" / "gift-cards" / "retrieval" / "lrurec",
                                      saved.proj.out_features, saved.first_id)
    assert not torch.equal(saved.proj.weight, fresh.proj.weight)     # it trained
    torch.testing.assert_close(saved.table, fresh.table)             # the retriever's, unchanged
    cfg = finetune.FinetuneConfig(tiny_backbone=True, index_kind="none", item_tokens=True,
                                  max_len=512)
    model, tok = load_ranker(run / "best", cfg)
    assert model.item_tokens.first_id == saved.first_id
    assert len(tok) == saved.first_id + saved.num_items
    bundle = load_bundle(trained / "b")
    assert bundle.ranker_config().item_tokens
    ex, _ = bundle.examples(bundle.candidates.query("split == 'test'")["user"].head(2).tolist())
    assert item_token(ex[0].candidates[0]) in ex[0].input         # the prompt names each item's token
    ranked = bundle.rank([e.user for e in ex], batch_size=2)
    assert all(np.isclose(r["prob"].sum(), 1.0, atol=1e-4) for r in ranked)


def test_a_resumed_run_with_soft_tokens_equals_a_straight_one(trained, tmp_path, monkeypatch):
    """The projection is part of the checkpoint: stop at step 2, resume to 4 == 4 straight."""
    monkeypatch.setenv("ULMREC_RUNS", str(trained / "runs"))
    common = ARGS + ["--item-tokens", "--max-steps", "4", "--eval-every", "4", "--batch-size", "2",
                     "--eval-users", "4", "--warmup-steps", "0", "--seed", "3"]
    assert finetune.main(common + ["--run-name", "straight"]) == 0
    assert finetune.main(common + ["--run-name", "boxed", "--stop-after", "2"]) == 0
    assert finetune.main(common + ["--run-name", "boxed"]) == 0
    runs = trained / "runs" / "gift-cards" / "finetune"
    a, b = ItemTokens.load(runs / "straight" / "last"), ItemTokens.load(runs / "boxed" / "last")
    torch.testing.assert_close(a.proj.weight, b.proj.weight)


def test_a_hybrid_warm_start_keeps_its_projection(trained):
    """--init-from a run with soft tokens carries their projection on (from a text-only
    adapter it would start fresh: the text-first, then hybrid curriculum)."""
    from ulmrec.finetune import init_weights
    run = trained / "runs" / "gift-cards" / "finetune" / "t" / "best"
    cfg = finetune.FinetuneConfig(tiny_backbone=True, index_kind="none", item_tokens=True,
                                  retriever="lrurec", max_len=512, tasks=("next_item",),
                                  task_ratio=(1.0,), preference_source="extractive",
                                  max_history=3, max_title_words=4)
    model, _ = build_ranker(cfg, item_tokens_from=trained / "runs" / "gift-cards" / "retrieval" / "lrurec")
    saved = ItemTokens.load(run)
    assert not torch.equal(model.item_tokens.proj.weight, saved.proj.weight)
    init_weights(model, run, cfg)
    torch.testing.assert_close(model.item_tokens.proj.weight, saved.proj.weight)


def test_the_projection_learns_alone_at_its_own_rate(trained, monkeypatch):
    """--learning-rate 0 --item-tokens-lr: CoLLM's projector stage, the LoRA frozen."""
    from safetensors.torch import load_file
    monkeypatch.setenv("ULMREC_RUNS", str(trained / "runs"))
    common = ARGS + ["--max-steps", "2", "--eval-every", "2", "--batch-size", "2", "--eval-users", "4",
                     "--warmup-steps", "0", "--lora-dropout", "0", "--learning-rate", "0", "--seed", "5"]
    for name, lr in (("projector", "0.01"), ("still", "0")):
        assert finetune.main(common + ["--item-tokens", "--item-tokens-lr", lr, "--run-name", name]) == 0
    runs = trained / "runs" / "gift-cards" / "finetune"
    moved, start = (ItemTokens.load(runs / n / "last").proj.weight for n in ("projector", "still"))
    assert not torch.equal(moved, start)                   # same seed, same start: it trained
    lora = load_file(str(runs / "projector" / "last" / "adapter_model.safetensors"))
    b = [t for k, t in lora.items() if "lora_B" in k]
    assert b and all(torch.count_nonzero(t) == 0 for t in b)
    with pytest.raises(ValueError, match="item-tokens-lr"):
        finetune.main(common + ["--item-tokens-lr", "0.01", "--run-name", "text-only"])
