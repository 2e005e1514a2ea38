"""bench/paired.py: per-user comparisons on the users every run scored, and seed ensembles."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bench import paired


def _run(root, name, probs, users=(1, 2, 3)):
    """A run's test predictions: 3 candidates per user, the target always the second."""
    folder = root / "games" / "finetune" / name
    folder.mkdir(parents=True)
    pd.DataFrame({"user": list(users), "candidates": [[10, 20, 30]] * len(users),
                  "target": [20] * len(users), "probs": [list(p) for p in probs]}
                 ).to_parquet(folder / "test_predictions.parquet", index=False)


@pytest.fixture()
def runs(monkeypatch, tmp_path):
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    # a: confident and right for user 1, b: confident and right for users 2 and 3;
    # each is mildly wrong where the other is right, so their average is right for everyone
    _run(tmp_path, "a", [[0.05, 0.9, 0.05], [0.5, 0.4, 0.1], [0.5, 0.4, 0.1]])
    _run(tmp_path, "b", [[0.5, 0.4, 0.1], [0.05, 0.9, 0.05], [0.05, 0.9, 0.05]])
    _run(tmp_path, "c", [[0.5, 0.4, 0.1]] * 2, users=(1, 2))
    return tmp_path


def test_ensemble_averages_log_probs_on_the_shared_users(runs, capsys):
    out = runs / "pairs.json"
    assert paired.main(["--runs", "a", "b", "--ensemble", "a,b", "--out", str(out),
                        "--bootstrap", "100"]) == 0
    rows = {(r["a"], r["b"]): r for r in json.loads(out.read_text())}
    assert rows[("a", "b")]["mean"] == pytest.approx((1 / np.log2(3) - 1) / 3)
    ens = rows[("a", "ensemble of a + b")]        # a − ensemble: the ensemble wins users 2, 3
    assert ens["b_better"] == 2 and ens["a_better"] == 0
    assert rows[("retriever order", "ensemble of a + b")]["mean"] == pytest.approx(1 / np.log2(3) - 1)
    assert paired.main(["--runs", "a", "c", "--out", str(out), "--bootstrap", "100"]) == 0
    assert {r["users"] for r in json.loads(out.read_text())} == {2}   # users both runs scored


def test_ensemble_must_name_two_of_the_runs(runs, capsys):
    assert paired.main(["--runs", "a", "b", "--ensemble", "a,x", "--out", str(runs / "p.json")]) == 2
    assert "not among them: x" in capsys.readouterr().err
    assert paired.main(["--runs", "a", "b", "--ensemble", "a", "--out", str(runs / "p.json")]) == 2


def test_retrievers_are_paired_on_the_users_both_listed(monkeypatch, tmp_path, capsys):
    from bench import retrieval_paired
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    lists = [list(range(1, 21))] * 3
    for name, targets, users in (("base", [1, 12, 50], (1, 2, 3)), ("new", [1, 2, 7], (1, 2, 4))):
        folder = tmp_path / "games" / "retrieval" / name
        folder.mkdir(parents=True)
        pd.DataFrame({"user": list(users), "split": ["test"] * 3, "target": targets,
                      "candidates": lists}).to_parquet(folder / "candidates.parquet", index=False)
    out = tmp_path / "pairs.json"
    assert retrieval_paired.main(["--runs", "base", "new", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["test_users"] == 2                             # user 3 and 4 are in one run only
    # user 1: rank 1 in both; user 2: rank 12 → rank 2
    assert rep["metrics"]["base"]["Recall@10"] == 0.5 and rep["metrics"]["new"]["Recall@10"] == 1.0
    assert rep["paired"]["new"]["Recall@20"]["mean"] == 0.0
    assert rep["paired"]["new"]["NDCG@10"]["mean"] == pytest.approx(1 / np.log2(3) / 2)
    assert retrieval_paired.main(["--runs", "base", "absent", "--out", str(out)]) == 2
    assert "absent" in capsys.readouterr().err
    empty = tmp_path / "games" / "retrieval" / "empty"                # no test rows at all
    empty.mkdir()
    pd.DataFrame({"user": [1], "split": ["val"], "target": [1], "candidates": [lists[0]]}
                 ).to_parquet(empty / "candidates.parquet", index=False)
    assert retrieval_paired.main(["--runs", "base", "empty", "--out", str(out)]) == 2
    assert "share no test user" in capsys.readouterr().err


def test_retriever_groups_average_their_seeds_per_user(monkeypatch, tmp_path):
    from bench import retrieval_paired
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    for name, target in (("a", 1), ("b", 15), ("c", 1)):     # rank 1, rank 15, rank 1 for user 7
        folder = tmp_path / "games" / "retrieval" / name
        folder.mkdir(parents=True)
        pd.DataFrame({"user": [7], "split": ["test"], "target": [target],
                      "candidates": [list(range(1, 21))]}).to_parquet(folder / "candidates.parquet")
    out = tmp_path / "pairs.json"
    assert retrieval_paired.main(["--runs", "a,b", "c", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["metrics"]["a,b"]["Recall@10"] == 0.5 and rep["metrics"]["a,b"]["Recall@20"] == 1.0
    assert rep["paired"]["c"]["Recall@10"]["mean"] == 0.5


def test_merge_adds_pairs_and_replaces_only_the_same_pair_of_the_same_sample(runs):
    out = runs / "pairs.json"
    out.write_text(json.dumps([{"a": "old", "b": "retriever order", "mean": 0.1, "lo": 0, "hi": 0.2},
                               {"a": "a", "b": "b", "mean": 9.0, "lo": 9, "hi": 9, "sample": 0}]))
    assert paired.main(["--runs", "a", "b", "--out", str(out), "--bootstrap", "100", "--merge"]) == 0
    rows = json.loads(out.read_text())
    keys = [(r["a"], r["b"], r.get("sample")) for r in rows]
    assert ("old", "retriever order", None) in keys                # kept
    assert keys.count(("a", "b", 0)) == 1                           # replaced, not doubled
    assert next(r for r in rows if (r["a"], r["b"]) == ("a", "b"))["mean"] != 9.0
    assert paired.main(["--runs", "a", "b", "--out", str(out), "--bootstrap", "100"]) == 0
    assert "old" not in {r["a"] for r in json.loads(out.read_text())}   # without --merge: replaced


def test_pairs_of_several_orders_are_named_apart_from_the_runs_single_order(runs):
    """--orders 2 reads the _o2 predictions and names the row as train.evaluate does, so a
    merge keeps both the one-order and the two-order pair of the same run."""
    folder = runs / "games" / "finetune" / "a"
    flat = pd.read_parquet(folder / "test_predictions.parquet")
    flat.assign(probs=[[0.1, 0.8, 0.1]] * 3).to_parquet(folder / "test_predictions_o2.parquet", index=False)
    out = runs / "pairs.json"
    assert paired.main(["--runs", "a", "--out", str(out), "--bootstrap", "100"]) == 0
    assert paired.main(["--runs", "a", "--orders", "2", "--out", str(out), "--bootstrap", "100",
                        "--merge"]) == 0
    rows = {r["a"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"a", "a × 2 orders"}
    assert rows["a × 2 orders"]["mean"] == pytest.approx(1 / np.log2(2) - 1 / np.log2(3))
    assert rows["a"]["mean"] == pytest.approx((1 / np.log2(2) - 1 / np.log2(3)) / 3)


def test_the_weight_curve_runs_from_the_llm_term_to_the_retrievers_order(monkeypatch, tmp_path, capsys):
    from bench import residual_weight
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    folder = tmp_path / "games" / "finetune" / "res"
    folder.mkdir(parents=True)
    # the retriever lists the target second; the LLM term puts it first for user 1 only
    pd.DataFrame({"user": [1, 2], "candidates": [[10, 20, 30]] * 2, "target": [20, 20],
                  "probs": [[0.3, 0.4, 0.3]] * 2,
                  "llm_probs": [[0.1, 0.8, 0.1], [0.8, 0.15, 0.05]],
                  "retriever_scores": [[3.0, 2.0, 1.0]] * 2}).to_parquet(folder / "test_predictions.parquet")
    curve = residual_weight.weight_curve(pd.read_parquet(folder / "test_predictions.parquet"))
    assert curve["w 0"] == pytest.approx((1 + 1 / np.log2(3)) / 2)        # the LLM term alone
    assert curve["w 5"] == pytest.approx(curve["retriever order"]) == pytest.approx(1 / np.log2(3))
    assert residual_weight.main(["--run", "res"]) == 0 and "w 0.7" in capsys.readouterr().out
    pd.DataFrame({"user": [1], "candidates": [[10, 20]], "target": [20], "probs": [[0.5, 0.5]]}
                 ).to_parquet(folder / "test_predictions_b1.parquet")
    assert residual_weight.main(["--run", "res", "--block", "1"]) == 2
    assert "not a residual run" in capsys.readouterr().err
