"""The ranker's position levers: shuffled hard lists, the residual over the retriever (trained
and served as one sum), the position habits every row reports, and a second, disjoint sample."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from ulmrec.fusion import fit_residual_weight, fuse
from ulmrec.metrics import sample_eval_users
from ulmrec.model import collate, response_loss
from ulmrec.tasks import TaskConfig, task_inputs, training_examples, user_index_strings


@pytest.fixture(scope="module")
def hard_inputs(gift_cards):
    """Inputs with a retriever list (target at a known place) and its scores for 40 users."""
    inp = task_inputs(gift_cards, user_index_strings(gift_cards, "oid"), None, max_title_words=8)
    train, val, test = gift_cards.sequences("train"), gift_cards.targets("val"), gift_cards.targets("test")
    users = [u for u, s in train.items() if len(s) >= 3][:40]
    lists, scores = {}, {}
    for k, u in enumerate(users):
        pool = [i for i in range(1, gift_cards.num_items + 1)
                if i not in set(train[u]) | {int(val[u]), int(test[u])}][:19]
        lists[u] = pool[: k % 20] + [train[u][-1]] + pool[k % 20:]
        scores[u] = [10.0 - j for j in range(20)]          # the retriever's order, descending
    return replace(inp, retrieved=pd.Series(lists), retrieved_scores=pd.Series(scores)), lists


def test_shuffled_hard_lists_keep_items_answer_and_scores_together(hard_inputs):
    inp, lists = hard_inputs
    cfg = TaskConfig(tasks=("next_item",), task_ratio=(1.0,), train_candidates="retriever-only",
                     num_candidates=20)
    kept = {e.user: e for e in training_examples(inp, cfg)}
    mixed = {e.user: e for e in training_examples(inp, replace(cfg, shuffle_hard=True))}
    assert set(kept) == set(mixed) == set(lists)
    moved = 0
    for u, e in mixed.items():
        assert kept[u].candidates == lists[u] and kept[u].prior == [10.0 - j for j in range(20)]
        assert sorted(e.candidates) == sorted(lists[u])
        assert e.candidates[ord(e.response) - ord("A")] == e.target
        # each item keeps its own retriever score through the shuffle
        assert all(s == 10.0 - lists[u].index(i) for i, s in zip(e.candidates, e.prior))
        moved += e.candidates != lists[u]
    assert moved >= 38
    # where the answer sits: spread over the letters, not the retriever's place
    assert len({e.response for e in mixed.values()}) >= 10


def test_validation_lists_train_on_held_out_targets_less_the_sample(gift_cards, hard_inputs):
    """train_candidates validation: one prompt per user, the whole training sequence → the
    validation item on the retriever's validation list (shuffled, scores kept); the users of
    the validation sample and lists without their target give none."""
    inp, _ = hard_inputs
    train, val = gift_cards.sequences("train"), gift_cards.targets("val")
    users = [u for u, s in train.items() if len(s) >= 3][:30]
    lists, scores = {}, {}
    for k, u in enumerate(users):
        pool = [i for i in range(1, gift_cards.num_items + 1)
                if i not in set(gift_cards.sequences("test")[u]) | {int(val[u])}][:19]
        # every third list misses its target: such a user gives no prompt
        lists[u] = pool[:k % 20] + ([int(val[u])] if k % 3 else pool[19:20]) + pool[k % 20:]
        scores[u] = [10.0 - j for j in range(20)]
    holdout = frozenset(users[:4])
    vinp = replace(inp, retrieved=pd.Series(lists), retrieved_scores=pd.Series(scores),
                   retrieved_target=pd.Series({u: int(val[u]) for u in users}), holdout=holdout)
    cfg = TaskConfig(tasks=("next_item",), task_ratio=(1.0,), train_candidates="validation",
                     shuffle_hard=True, max_history=50)
    exs = training_examples(vinp, cfg)
    want = {u for k, u in enumerate(users) if k % 3 and u not in holdout}
    assert {e.user for e in exs} == want and len(exs) == len(want)
    for e in exs:
        assert e.target == int(val[e.user]) and e.candidates[ord(e.response) - ord("A")] == e.target
        assert sorted(e.candidates) == sorted(lists[e.user])
        assert all(s == 10.0 - lists[e.user].index(i) for i, s in zip(e.candidates, e.prior))
        # the history is the whole training sequence: its last title is shown
        assert inp.titles[train[e.user][-1]] in e.input
    assert sum(e.candidates != lists[e.user] for e in exs) >= len(exs) - 1


def test_residual_loss_is_cross_entropy_of_the_served_sum():
    """The letters loss with a residual weight is the cross-entropy of letter logits + w ·
    log-softmax(retriever scores); w = 0 is the LLM alone; a row without scores is flat."""
    torch.manual_seed(0)
    vocab, k = 50, 4
    letter_ids = [10, 11, 12, 13]
    logits = torch.randn(2, 3, vocab)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, logits_to_keep):
            return type("Out", (), {"logits": logits[:, -logits_to_keep:]})()

    rows = [{"input_ids": [1, 2, 12, 0], "labels": [-100, -100, 12, 0], "prior": [3.0, 1.0, 0.5, 0.0]},
            {"input_ids": [1, 2, 11, 0], "labels": [-100, -100, 11, 0]}]
    batch = collate(rows, 0)
    assert batch["prior"].tolist() == [[3.0, 1.0, 0.5, 0.0], [0.0] * 4]
    w = 1.7
    got = response_loss(Fixed(), batch, letter_ids, per_example=True, residual_weight=w)
    # 3 positions kept (answer + EOS + 1); the first of them predicts the answer letter
    first = logits[:, 0, letter_ids]
    prior = torch.log_softmax(batch["prior"], dim=1)
    want = torch.nn.functional.cross_entropy(first + w * prior, torch.tensor([2, 1]))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    alone = response_loss(Fixed(), batch, letter_ids, per_example=True)
    assert alone.item() == pytest.approx(
        torch.nn.functional.cross_entropy(first, torch.tensor([2, 1])).item(), rel=1e-5)
    assert got.item() != pytest.approx(alone.item(), rel=1e-3)


def test_residual_weight_recovers_the_retrievers_temperature():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3000, 20))
    true_w = 2.0
    p = np.exp(true_w * scores)
    p /= p.sum(axis=1, keepdims=True)
    pos = np.array([rng.choice(20, p=row) for row in p])
    fit = fit_residual_weight(scores.tolist(), pos)
    assert fit["weight"] == pytest.approx(true_w, abs=0.3) and fit["lists"] == 3000
    # uninformative scores: no weight
    assert fit_residual_weight(scores.tolist(), rng.integers(0, 20, 3000))["weight"] <= 0.2
    with pytest.raises(ValueError, match="no lists"):
        fit_residual_weight([], [])


def test_second_sample_is_disjoint_and_the_first_is_the_usual_one():
    users = list(range(100, 1100))
    first = sample_eval_users(users, 200, 42)
    assert first == sample_eval_users(users, 200, 42, block=0)
    second = sample_eval_users(users, 200, 42, block=1)
    third = sample_eval_users(users, 200, 42, block=2)
    assert len(second) == len(third) == 200
    assert not set(first) & set(second) and not set(second) & set(third) and not set(first) & set(third)
    assert second == sample_eval_users(list(reversed(users)), 200, 42, block=1)  # order-free
    with pytest.raises(ValueError, match="needs 1200"):
        sample_eval_users(users, 200, 42, block=5)


def test_position_habits_measure_copying_the_list():
    from ulmrec.metrics import order_habits
    k = 20
    same = np.tile(np.arange(k, 0, -1.0), (2, 1))             # the retriever's own order
    assert order_habits(same) == {"top_letter_a": 1.0, "spearman_with_retriever": pytest.approx(1.0)}
    rev = same[:, ::-1].copy()                                 # the reverse order
    h = order_habits(rev)
    assert h["top_letter_a"] == 0.0 and h["spearman_with_retriever"] == pytest.approx(-1.0)
    mixed = np.vstack([same[0], rev[0]])
    assert order_habits(mixed) == {"top_letter_a": 0.5, "spearman_with_retriever": pytest.approx(0.0)}


def test_residual_run_trains_evaluates_and_pairs_as_its_sum(tmp_path, monkeypatch):
    """A tiny retriever, a residual ranker on its shuffled hard lists, its evaluation: the run's
    row ranks by log p_LLM + w · log-softmax(retriever), its LLM term has a row of its own, and
    bench/paired.py reads both from the predictions."""
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    from train import evaluate, finetune, retrieve
    assert retrieve.main(["--dataset", "gift-cards", "--model", "lrurec", "--max-epochs", "3",
                          "--hidden", "16", "--threads", "1", "--ema-epochs", "0"]) == 0
    from tiny_run import RESIDUAL_DATA as data
    assert finetune.main(data + [
        "--run-name", "res", "--tasks", "next_item", "--task-ratio", "1", "--loss", "letters",
        "--train-candidates", "retriever-only", "--shuffle-hard", "--residual",
        "--residual-weight", "1.5", "--batch-size", "2", "--max-steps", "2", "--eval-every", "2",
        "--eval-users", "4", "--lora-dropout", "0", "--learning-rate", "0.01",
        "--warmup-steps", "0"]) == 0
    run = tmp_path / "gift-cards" / "finetune" / "res"
    saved = json.loads((run / "best" / "ulmrec_config.json").read_text())
    assert saved["residual"] and saved["residual_weight"] == 1.5 and saved["shuffle_hard"]
    out = tmp_path / "results"
    assert evaluate.main(data + ["--runs", "res", "--baselines", "retriever", "--max-users", "200",
                                 "--results-dir", str(out)]) == 0
    results = json.loads((out / "gift-cards.json").read_text())["results"]
    assert results["res"]["residual_weight"] == 1.5
    assert {"top_letter_a", "spearman_with_retriever"} <= set(results["res (LLM term alone)"])
    pred = pd.read_parquet(run / "test_predictions.parquet")
    llm = np.stack(pred["llm_probs"].map(np.asarray))
    retr = np.stack(pred["retriever_scores"].map(np.asarray))
    summed = fuse(llm, retr, 1.5)
    shown = np.stack(pred["probs"].map(np.asarray))
    np.testing.assert_allclose(np.log(shown) - np.log(shown).max(axis=1, keepdims=True),
                               summed - summed.max(axis=1, keepdims=True), atol=1e-6)
    # two candidate orders: a row of its own, predictions beside the one-order ones
    assert evaluate.main(data + ["--runs", "res", "--baselines", "retriever", "--max-users", "200",
                                 "--test-orders", "2", "--results-dir", str(tmp_path / "o2")]) == 0
    assert "res × 2 orders" in json.loads((tmp_path / "o2" / "gift-cards.json").read_text())["results"]
    assert (run / "test_predictions_o2.parquet").exists()
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "paired.py"), "--dataset", "gift-cards",
                           "--runs", "res", "--bootstrap", "200", "--out", str(tmp_path / "p.json")],
                          capture_output=True, text=True, env={**__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "res (LLM term alone)" in proc.stdout and "top letter A" in proc.stdout


def test_averaging_over_orders_takes_each_items_score_back_to_it(gift_cards):
    """score_orders: one order is score_examples; with a model that only reads positions (its
    letter logits fixed), averaging over shuffled orders flattens what position gave."""
    from ulmrec.model import score_examples, score_orders
    from ulmrec.ranker import load_base, load_candidates, load_task_inputs
    from ulmrec.finetune import FinetuneConfig
    from ulmrec.tasks import eval_examples
    cfg = FinetuneConfig(dataset="gift-cards", tiny_backbone=True, retriever="random",
                         index_kind="oid", preference_source="none", max_history=3,
                         max_title_words=4)
    inp, _ = load_task_inputs(gift_cards, cfg)
    exs, _ = eval_examples(gift_cards, inp, load_candidates(gift_cards, cfg, "test"), "test", cfg)
    exs = exs[:3]
    model, tok = load_base(cfg)
    kw = dict(max_len=512, progress=False)
    one, _ = score_orders(model, tok, exs, orders=1, **kw)
    np.testing.assert_allclose(one.numpy(), score_examples(model, tok, exs, **kw)[0].numpy())
    mean, probs = score_orders(model, tok, exs, orders=3, seed=1, **kw)
    assert mean.shape == (3, 20) and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    # by hand: the second order, scored as its own prompts, maps back item by item
    import random
    from dataclasses import replace as dc_replace
    from ulmrec.prompts import LETTERS, candidates_block
    rng = random.Random(1)
    orders = [list(range(20))]
    for _ in range(2):
        ps = [list(range(20)) for _ in exs]
        for p in ps:
            rng.shuffle(p)
        orders.append(ps)
    want = torch.zeros(3, 20)
    for k, ps in enumerate(orders):
        ps = ps if k else [list(range(20))] * 3
        shown = []
        for ex, p in zip(exs, ps):
            head, _, block = ex.input.rpartition("Candidates:\n")
            titles = [line.split(") ", 1)[1] for line in block.split("\n")]
            cands = [ex.candidates[j] for j in p]
            shown.append(dc_replace(ex, candidates=cands, input=head + candidates_block([titles[j] for j in p]),
                                    response=LETTERS[cands.index(ex.target)]))
        _, pr = score_examples(model, tok, shown, **kw)
        for row, p in enumerate(ps):
            want[row, p] += torch.log(pr[row])
    np.testing.assert_allclose(mean.numpy(), (want / 3).numpy(), rtol=1e-5, atol=1e-5)
