"""Build the user-index table of a dataset (ULMRec §4.1).

    python -m train.index --dataset gift-cards
    python -m train.index --dataset games                      # titles of training items
    python -m train.index --dataset games --use-preference     # + GPT-3.5 sentence: LEAK-PRONE
    python -m train.index --dataset games --kind nid           # Fig. 9 alternatives: nid, oid

Writes runs/<dataset>/<index|index-pref|index-nid|index-oid>/: user_index.parquet,
user_index.json, summary.json and (pid) model.safetensors. The build is ulmrec.indexing.build.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.data import DataError
from ulmrec.indexing.build import describe, run
from ulmrec.indexing.collisions import CollisionError
from ulmrec.indexing.fit import IndexConfig


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(IndexConfig, argv)
    try:
        summary = run(cfg)
    except (DataError, ValueError, CollisionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
