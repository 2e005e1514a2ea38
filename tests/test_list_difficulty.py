"""bench/list_difficulty.py: how often each split's retriever lists hold and top their target."""
import numpy as np
import pandas as pd
import pytest

from bench.list_difficulty import difficulty, main


def test_difficulty_counts_held_first_and_the_order_ndcg():
    frame = pd.DataFrame({"candidates": [[5, 6, 7], [5, 6, 7], [5, 6, 7], [1, 2, 3]],
                          "target": [5, 7, 6, 9],
                          "scores": [[3.0, 1.0, 0.0], [2.0, 1.5, 0.0], [1.0, 0.0, -1.0], [4.0, 2.0, 1.0]]})
    d = difficulty(frame, k=3)
    assert d["users"] == 4 and d["held"] == 0.75 and d["first"] == pytest.approx(1 / 3)
    assert d["ndcg10"] == pytest.approx((1 + 1 / np.log2(4) + 1 / np.log2(3)) / 3)
    assert d["gap"] == pytest.approx((2.0 + 0.5 + 1.0 + 2.0) / 4)


def test_missing_candidates_say_which_command_makes_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path))
    assert main(["--dataset", "games"]) == 2
    assert "train.retrieve --dataset games" in capsys.readouterr().err
