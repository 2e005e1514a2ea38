"""Load, filter and split a dataset; print its statistics in the paper's Table-1 form.

    python -m train.data --dataset gift-cards
    python -m train.data --dataset all            # every dataset under ../shared/data
    python -m train.data --reviews my_5.json.gz --meta meta_my.json.gz --strict
    python -m train.data --reviews cut_5.json.gz --meta meta_my.json.gz --allow-truncated

Exit status: 0 loaded; 2 bad input (a damaged, empty or unusable file, a malformed line
under --strict, a bad --config, no users left), named on one line.
"""
from __future__ import annotations

import logging
import sys
import time

from ulmrec.config import parse_config
from ulmrec.data import SOURCES, DataConfig, DataError, load_dataset
from ulmrec.data.dataset import data_root

log = logging.getLogger("train.data")


def table1(rows: list[dict]) -> str:
    head = f"{'Dataset':<14}{'# Users':>10}{'# Items':>10}{'# Interact.':>13}{'# Length':>10}{'# Sparsity':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['dataset']:<14}{r['users']:>10,}{r['items']:>10,}{r['interactions']:>13,}"
                     f"{r['avg_length']:>10.2f}{r['sparsity'] * 100:>11.2f}%")
    return "\n".join(lines)


def describe(ds) -> str:
    """One paragraph on where the data came from and what was dropped or substituted."""
    info = ds.info
    parts = [f"{ds.name}: {info['kind']} source, text kind {'/'.join(info['text_kind'])}"]
    for what, rep in info["lines"].items():
        parts.append(f"{what} {rep['kept']:,}/{rep['read']:,} lines kept"
                     + (f", {rep['malformed']} malformed skipped" if rep["malformed"] else "")
                     + (" (TRUNCATED file: only the lines before the damage)"
                        if rep.get("truncated") else ""))
    counts = info.get("counts", {})
    for key in ("duplicate_user_item", "reviews_without_titled_item", "title_fallbacks"):
        if counts.get(key):
            parts.append(f"{key.replace('_', ' ')}: {counts[key]:,}")
    if "from_cache" in info:
        parts.append("from cache")
    text = "; ".join(parts)
    for rep in info["lines"].values():
        if rep.get("truncated"):  # kept under --allow-truncated: never a quiet footnote
            text += f"\n  WARNING: {rep['truncated']}; kept the {rep['read']:,} lines before it"
        for issue in rep["first_issues"][:5]:
            text += f"\n  skipped {issue}"
    return text


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(DataConfig, argv)
    names = list(SOURCES) if cfg.dataset == "all" and not cfg.reviews else [cfg.dataset]
    rows, failed = [], 0
    for name in names:
        t0 = time.time()
        try:
            ds = load_dataset(DataConfig(**{**cfg.__dict__, "dataset": name}))
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
            continue
        print(describe(ds) + f"  [{time.time() - t0:.1f}s]")
        rows.append(ds.stats())
    if rows:
        print()
        print(table1(rows))
        print(f"\n(data root: {data_root()})")
    # 'all' may legitimately hit a dataset with no users left; a single named one may not.
    return 2 if failed and (len(names) == 1 or not rows) else 0


if __name__ == "__main__":
    sys.exit(main())
