"""Export a fine-tuned run as a bundle: adapter, tokenizer, user index, candidates, metrics,
config and a Hub model card, in one folder swapped in atomically.

    python -m train.export --dataset gift-cards --run-name demo --out assets/demo --no-include-data
    python -m train.export --dataset games --run-name ulmrec          # → runs/games/bundle

`--include-data` (default) adds the items and users tables (titles, histories, targets,
preferences): a bundle for the Hub that loads anywhere. Without it the bundle holds only
what this project made and is joined at load time with the dataset under ULMREC_DATA.
The export itself is ulmrec.export.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.export import ExportConfig, bundle_dir, export  # noqa: F401  (its API)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    export(parse_config(ExportConfig, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
