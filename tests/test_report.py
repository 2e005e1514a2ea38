"""The one markdown table format of results files, model cards and benchmark reports."""
import pytest

from ulmrec.evaluate import results_table
from ulmrec.report import markdown_table


def test_markdown_table_is_compact_with_numbers_right_aligned():
    table = markdown_table(["system", "N@10", "note"], [["full", "0.1234", ""], ["chance", 0.5, "x"]], "lrl")
    assert table.splitlines() == ["| system | N@10 | note |", "|---|---:|---|",
                                  "| full | 0.1234 |  |", "| chance | 0.5 | x |"]


@pytest.mark.parametrize("rows, align", [([["a", "b"]], "l"),      # an alignment short
                                         ([["a", "b"]], "lc"),     # not l or r
                                         ([["a"]], "lr")])         # a row short
def test_markdown_table_refuses_a_shape_or_alignment_that_does_not_fit(rows, align):
    with pytest.raises(ValueError):
        markdown_table(["x", "y"], rows, align)


def test_the_results_table_keeps_its_columns_and_four_decimals():
    views = {"rank": {"Recall@5": 0.5, "NDCG@5": 0.25, "MRR@5": 0.125, "Recall@10": 1.0,
                      "NDCG@10": 0.3, "MRR@10": 0.2}}
    views["overall"] = {k: v / 10 for k, v in views["rank"].items()}
    text = results_table({"dataset": "gift-cards", "test_users": 16, "command": "python -m train.evaluate",
                          "results": {"full+uid": views}})
    assert text.splitlines()[2:] == [
        "| system | view | R@5 | N@5 | M@5 | R@10 | N@10 | M@10 |", "|---|---|---:|---:|---:|---:|---:|---:|",
        "| full+uid | Rank | 0.5000 | 0.2500 | 0.1250 | 1.0000 | 0.3000 | 0.2000 |",
        "| full+uid | Overall | 0.0500 | 0.0250 | 0.0125 | 0.1000 | 0.0300 | 0.0200 |"]
