"""CLI: one preference (or intent) text per user, cached and resumable.

    python -m train.preferences --dataset gift-cards --backend local
    OPENAI_API_KEY=... python -m train.preferences --dataset gift-cards --backend openai \
        --base-url https://api.openai.com/v1 --openai-model gpt-3.5-turbo
    python -m train.preferences --dataset games            # auto → the authors' release text
"""
from __future__ import annotations

import logging
import sys

from ulmrec.config import parse_config
from ulmrec.data import DataError
from ulmrec.preferences import PreferenceConfig
from ulmrec.preferences.run import run


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        s = run(parse_config(PreferenceConfig, argv))
    except DataError as err:
        sys.exit(f"error: {err}")
    print(f"{s['dataset']} {s['task']} [{s['backend']} / {s['model']}]: {s['users']} users — "
          f"done {s['done']}, cached {s['cached']}, failed {s['failed']}, "
          f"fallback {s['fallback']} in {s['seconds']} s → {s['path']}")
    return s


if __name__ == "__main__":
    main()
