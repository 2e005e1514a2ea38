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
