"""`python -m train <command> [flags]`: the whole pipeline, or one stage of it.

    python -m train run --config configs/demo.yaml [--from STAGE] [--only STAGE] [--dry-run]
    python -m train retrieve --dataset games --model lrurec      # = python -m train.retrieve ...
"""
from __future__ import annotations

import importlib
import sys

from ulmrec.config import prog_name

# command → module; imported only when chosen (stages pull in torch / transformers)
COMMANDS = {
    "run": ("train.pipeline", "every stage of a pipeline YAML, skipping what is current"),
    "data": ("train.data", "load, filter and split a dataset; Table-1 statistics"),
    "retrieve": ("train.retrieve", "train LRURec / SASRec, export top-20 candidates"),
    "index": ("train.index", "build the user index (RQ-VAE over reviews)"),
    "preferences": ("train.preferences", "one preference / intent text per user"),
    "finetune": ("train.finetune", "tune the ranker LLM on the six alignment tasks"),
    "evaluate": ("train.evaluate", "Rank / Overall metrics on test"),
    "lcrec": ("train.lcrec", "LC-Rec baseline: item index, tuning, whole-catalogue generation"),
    "p2rec": ("train.p2rec", "P2Rec: user-level preference SFT, enhanced item embeddings"),
    "export": ("train.export", "write the artifact bundle of a fine-tuned run"),
    "push": ("train.push", "upload a bundle to the Hugging Face Hub"),
}


def usage() -> str:
    lines = ["usage: python -m train <command> [flags]   (python -m train <command> -h for flags)", "",
             "commands:"]
    lines += [f"  {name:<12} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = COMMANDS[argv[0]][0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:  # a missing dependency inside the module: show it as it is
            raise
        print(f"error: command {argv[0]!r} needs {name}, which is not in this checkout", file=sys.stderr)
        return 2
    with prog_name(f"python -m train {argv[0]}"):  # usage lines name the command typed
        rc = module.main(argv[1:])
    return rc if isinstance(rc, int) else 0  # train.preferences returns its summary dict


if __name__ == "__main__":
    sys.exit(main())
