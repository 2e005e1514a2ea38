"""One process of a multi-process fine-tuning run, for tests/test_finetune_ddp.py:

    torchrun --standalone --nproc_per_node 2 tests/ddp_finetune.py OUT_DIR [finetune args...]

Runs train.finetune.train and writes what this process saw to OUT_DIR/rank<RANK>.json.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import finetune  # noqa: E402
from ulmrec.config import parse_config  # noqa: E402

out = Path(sys.argv[1])
summary = finetune.train(parse_config(finetune.FinetuneConfig, sys.argv[2:]))
keys = ("steps", "lr", "scheduler_steps", "early_stop", "history", "processes")
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(
    json.dumps({k: summary.get(k) for k in keys}, default=str))
