"""LC-Rec end to end: item index → alignment tuning → generative full-catalogue evaluation.

    python -m train.lcrec --dataset games                                  # all three stages
    python -m train.lcrec --dataset games --stages evaluate --eval-users 500
    python -m train.lcrec --dataset games --max-steps 60 --train-users 400 --eval-users 40 \
        --prompt-format alpaca --max-history 10                            # small CPU run

Writes runs/<dataset>/lcrec/ (index/, finetune/, eval/); each stage skips work already done,
--force redoes the stages named in --stages. The stages are ulmrec.lcrec.run.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.lcrec.run import LcRecConfig, UnknownStage, model_dir, outputs, run  # noqa: F401  (its API)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(parse_config(LcRecConfig, argv))
    except UnknownStage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
