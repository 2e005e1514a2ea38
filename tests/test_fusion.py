"""Retriever prior fusion on hand-built cases: λ = 0 is the LLM, a large λ the retriever order,
and a fitted λ can beat both when they err on different users."""
import numpy as np
import pytest

from ulmrec.fusion import fit_lambda, fuse, rank_ndcg


def test_fusion_endpoints_are_the_parents():
    probs = np.array([[0.1, 0.6, 0.3]])
    retr = np.array([[3.0, 2.0, 1.0]])                       # retriever order: 0, 1, 2
    assert np.argsort(-fuse(probs, retr, 0.0))[0].tolist() == [1, 2, 0]
    assert np.argsort(-fuse(probs, retr, 1000.0))[0].tolist() == [0, 1, 2]


def test_fitted_lambda_beats_both_parents_when_they_err_on_different_users():
    # user 0: the LLM is sure and right (target 2), the retriever puts it last;
    # users 1, 2: the LLM is unsure and slightly wrong, the retriever is right (target 0)
    probs = np.array([[0.05, 0.05, 0.90], [0.30, 0.40, 0.30], [0.32, 0.36, 0.32]])
    retr = np.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    pos = np.array([2, 0, 0])
    fit = fit_lambda(probs, retr, pos)
    best = rank_ndcg(fuse(probs, retr, fit["lambda"]), pos).mean()
    assert best == pytest.approx(1.0)
    assert best > rank_ndcg(fuse(probs, retr, 0.0), pos).mean()          # LLM alone
    assert best > rank_ndcg(fuse(probs, retr, 1e6), pos).mean()          # retriever order
    assert 0 < fit["lambda"] < 5 and fit["val_users"] == 3


def test_fit_needs_users():
    with pytest.raises(ValueError, match="no validation users"):
        fit_lambda(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, dtype=int))
