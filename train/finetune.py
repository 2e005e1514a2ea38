"""Instruction-tune the ranker on the six alignment tasks (LoRA, or QLoRA on CUDA).

    python -m train.finetune --dataset games --config configs/cpu.yaml
    accelerate launch -m train.finetune --config configs/paper.yaml      # multi-GPU

Validation every `eval_every` optimizer steps keeps the best adapter in <out>/best; an
interrupted run resumes from <out>/checkpoint; `--init-from <run>/best` warm-starts a staged
or longer run. The stage itself is ulmrec.finetune, its loop ulmrec.trainer.
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.finetune import FinetuneConfig, InitFromError, run_dir, train  # noqa: F401  (the stage's API)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(parse_config(FinetuneConfig, argv))
    except InitFromError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
