"""Rank and Overall metrics on test (paper Table 2) for the retriever, the untuned backbone
and every fine-tuned run, in one table.

    python -m train.evaluate --dataset games --runs ulmrec llamarec ulmrec+uid \
        --baselines retriever backbone --max-users 500

Results go to results/<dataset>.json and .md, per-user predictions beside each run's adapter;
the evaluation itself is ulmrec.evaluate.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.evaluate import EvaluateConfig, results_stem, results_table, retriever_ranks, run  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = argv if argv is not None else sys.argv[1:]
    payload = run(parse_config(EvaluateConfig, argv), "python -m train.evaluate " + " ".join(args))
    print(results_table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
