"""train.evaluate reports what qualifies its numbers: the retriever row under the same tie rule
as the rankers, prompts cut to max_len, and leak-prone inputs (the authors' user index)."""
import gzip
import json

import numpy as np
import pandas as pd
import pytest

from train import evaluate
from ulmrec.data.release import RELEASE_INDEX_NOTE


def test_retriever_row_ranks_by_its_scores_with_ties_against_the_target():
    frame = pd.DataFrame({
        "user": [1, 2, 3, 4],
        "candidates": [[5, 9, 7], [9, 5, 7], [5, 7, 8], [5, 7, 9]],
        "scores": [[0.9, 0.5, 0.5],      # tied with the item after it: rank 3, not position 2
                   [0.8, 0.8, 0.1],      # tied with the item after it: rank 2, not 1
                   [0.9, 0.5, 0.4],      # not retrieved
                   [0.9, 0.5, 0.4]],     # beyond the top-k kept (k = 2): not retrieved
        "target": [9, 9, 9, 9]})
    ranks, retrieved = evaluate.retriever_ranks(frame, k=2 + 1)
    assert ranks.tolist() == [3.0, 2.0, np.inf, 3.0] and retrieved.tolist() == [True, True, False, True]
    ranks, retrieved = evaluate.retriever_ranks(frame, k=2)
    assert ranks[3] == np.inf and not retrieved[3]
    bad = frame.assign(scores=[[0.1]] * 4)
    with pytest.raises(ValueError, match="user 1: 2 candidates but 1 retriever scores"):
        evaluate.retriever_ranks(bad, k=2)


def _write(path, lines):
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A six-user release split with the authors' user index, and empty runs/ and cache/ (but
    the backbone the project already converted: that takes a minute)."""
    from ulmrec.paths import cache_root
    backbones = cache_root() / "backbones"
    backbones.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "backbones").symlink_to(backbones)
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    folder = tmp_path / "rel"
    folder.mkdir()
    _write(folder / "items.jsonl.gz", [json.dumps({"item": i, "asin": f"A{i}", "title": f"Item {i}"})
                                       for i in range(1, 31)])
    _write(folder / "sequences.jsonl.gz", [
        json.dumps({"user": u, "reviewerID": f"R{u}", "train": [u, u + 1, u + 2, u + 3],
                    "val": [20], "test": [21 + u]}) for u in range(1, 7)])
    (folder / "user_index.json.gz").write_bytes(gzip.compress(json.dumps(
        {f"R{u}": f" <a_{u}> <b_1> <c_2> <d_3>" for u in range(1, 7)}).encode()))
    return folder


def test_evaluation_reports_truncated_prompts_and_the_release_index_leak(release, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"dataset: {release}\nruns: []\nbaselines: [backbone, retriever]\n"
                      "tiny_backbone: true\nretriever: random\nindex_kind: release\n"
                      "preference_source: none\nmax_len: 40\nbatch_size: 3\n"
                      f"results_dir: {tmp_path / 'results'}\n")
    assert evaluate.main(["--config", str(config)]) == 0
    res = json.loads((tmp_path / "results" / "rel.json").read_text())["results"]
    backbone = res["backbone (untuned)"]
    assert backbone["truncated_prompts"] == 6                      # every prompt > 40 tokens
    assert backbone["leak_prone"] is True and RELEASE_INDEX_NOTE in backbone["notes"]
    assert any("6 of 6 test prompts" in n for n in backbone["notes"])
    table = (tmp_path / "results" / "rel.md").read_text()
    assert f"- backbone (untuned): {RELEASE_INDEX_NOTE}" in table
    assert "- backbone (untuned): 6 of 6 test prompts were longer than max_len 40" in table

    # the same users with a generous budget and a non-release index: nothing to flag
    config.write_text(config.read_text().replace("max_len: 40", "max_len: 2048")
                      .replace("index_kind: release", "index_kind: nid"))
    assert evaluate.main(["--config", str(config)]) == 0
    backbone = json.loads((tmp_path / "results" / "rel.json").read_text())["results"]["backbone (untuned)"]
    assert backbone["truncated_prompts"] == 0 and backbone["leak_prone"] is False
    assert "\n- " not in (tmp_path / "results" / "rel.md").read_text()


def test_runs_flag_alone_evaluates_the_baselines_only():
    from ulmrec.config import parse_config
    assert parse_config(evaluate.EvaluateConfig, ["--runs"]).runs == ()
    assert parse_config(evaluate.EvaluateConfig, ["--runs", "a", "b"]).runs == ("a", "b")
    assert parse_config(evaluate.EvaluateConfig, []).runs == ("ulmrec",)
