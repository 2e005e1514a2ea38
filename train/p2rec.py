"""P2Rec: pre-grouping → user-level SFT → item knowledge augmentation → Base/+CI/+P2Rec retrievers.

    python -m train.p2rec --dataset gift-cards --k 32 --threads 1 --fusion-seeds 0 1 2
    python -m train.p2rec --dataset games --k 32 --models lrurec --export-retriever     # GPU advised
    python -m train.p2rec --dataset gift-cards --tiny-backbone          # plumbing check, random LLM

Outputs in runs/<dataset>/p2rec/ (groups, sft/, enhanced item table, fusion/<model>-<variant>-s<seed>/,
summary.json, table.md); the stages are ulmrec.p2rec.run.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.data import DataError
from ulmrec.p2rec.run import P2RecConfig, export_retriever, run, table  # noqa: F401  (its API)

log = logging.getLogger("train.p2rec")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(P2RecConfig, argv)
    try:
        reports = run(cfg)
    except (DataError, ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    if "report" in cfg.stages and reports:
        print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
