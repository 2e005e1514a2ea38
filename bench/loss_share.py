"""Each task's share of the loss terms in a fine-tuning mix (how much of the gradient the
token-mean loss gives it), for the same examples a run with these settings trains on.

    python bench/loss_share.py --dataset games --config configs/cpu.yaml --train-candidates retriever \
        --max-len 768 --max-history 10 --grad-accum 1 --max-steps 600 --loss letters
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/loss_share.py` from anywhere

from ulmrec.report import markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from ulmrec.finetune import FinetuneConfig
    from ulmrec.config import parse_config
    from ulmrec.data import load_dataset
    from ulmrec.model import IGNORE, encode
    from ulmrec.ranker import build_ranker, load_task_inputs
    from ulmrec.tasks import training_examples

    cfg = parse_config(FinetuneConfig, argv)
    ds = load_dataset(cfg.data_config())
    inp, _ = load_task_inputs(ds, cfg)
    examples = training_examples(inp, cfg)
    if cfg.max_steps:
        examples = examples[: cfg.max_steps * cfg.batch_size * cfg.grad_accum]
    _, tok = build_ranker(cfg, ds, inp)
    terms, rows = Counter(), Counter()
    for ex in examples:
        n = sum(t != IGNORE for t in encode(tok, ex, cfg.prompt_format, cfg.max_len)["labels"])
        # the listwise loss scores a letter answer once (its EOS is not trained)
        terms[ex.task] += 1 if cfg.loss == "letters" and ex.task == "next_item" else n
        rows[ex.task] += 1
    total_terms, total_rows = sum(terms.values()), sum(rows.values())
    shares = [[task, rows[task], f"{rows[task] / total_rows:.1%}", terms[task], f"{terms[task] / total_terms:.1%}"]
              for task in sorted(rows)]
    print(markdown_table(["task", "examples", "share of examples", "loss terms", "share of the token-mean loss"],
                         shares, "lrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
