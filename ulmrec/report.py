"""Markdown tables for the results files, model cards and benchmark reports, in one format:
compact GitHub pipe tables with cells as given. Compact, not padded to column widths, so a
regenerated results/*.md changes only in the rows whose numbers changed."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

_RULES = {"l": "---", "r": "---:"}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> str:
    """`header` and `rows` of cells (str() of each: format numbers first, e.g. f"{x:.4f}");
    `align` one letter per column, "l" (left) or "r" (right: numbers), e.g. "lrrr"."""
    if len(align) != len(header) or set(align) - set(_RULES):
        raise ValueError(f"align {align!r}: one of 'l' or 'r' for each of the {len(header)} columns")
    rows = [list(r) for r in rows]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells for {len(header)} columns: {row}")
    rule = "|" + "|".join(_RULES[a] for a in align) + "|"
    return "\n".join([_line(header), rule, *map(_line, rows)])


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"
