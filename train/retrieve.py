"""Train a candidate retriever and export its top-20 candidates for validation and test.

    python -m train.retrieve --dataset games --model lrurec
    python -m train.retrieve --dataset games --model sasrec
    python -m train.retrieve --dataset games --model lrurec --seed 43 --tag s43   # another seed
    python -m train.retrieve --config configs/retrieval.yaml --dataset beauty

Re-running the same command resumes from runs/<dataset>/retrieval/<model>/last.pt.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.data import DataError
from ulmrec.retrieval import RetrievalConfig, run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(RetrievalConfig, argv)
    try:
        report = run(cfg)
    except (DataError, ValueError) as e:
        logging.getLogger("train.retrieve").error("%s", e)
        return 2
    t, c = report["test"], report["ranker_ceiling"]
    print(f"{cfg.dataset} {cfg.model}: best epoch {report['best_epoch']}/{report['epochs_trained']}, "
          f"{report['train_seconds_per_epoch']:.1f}s/epoch; test R@10 {t['Recall@10']:.4f} "
          f"N@10 {t['NDCG@10']:.4f} R@20 {t['Recall@20']:.4f}; candidate recall "
          + " ".join(f"{k.split('_')[0]} {v:.4f}" for k, v in c.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
