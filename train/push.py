"""Push an exported bundle to the Hugging Face Hub as one commit to a model repo.

    python -m train.push --bundle runs/gift-cards/bundle --repo-id me/ulmrec-gift-cards
    python -m train.push --bundle runs/gift-cards/bundle --repo-id me/ulmrec-gift-cards --private

The token comes from HF_TOKEN or `hf auth login` (never a flag: flags end up in shell history
and `ps`). HF_ENDPOINT points it at another Hub. The bundle is verified before anything is
sent; the commit URL is printed on success.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from ulmrec.bundle import BundleError
from ulmrec.config import parse_config
from ulmrec.hub import HubError, push_bundle


@dataclass
class PushConfig:
    """Push a bundle folder to a Hub model repo (token from HF_TOKEN or `hf auth login`)."""

    bundle: str = field(default="", metadata={"help": "bundle folder written by train.export"})
    repo_id: str = field(default="", metadata={"help": "Hub model repo 'user/name' (created if missing)"})
    private: bool = field(default=False, metadata={
        "help": "create the repo private (an existing repo keeps its visibility)"})
    commit_message: str | None = field(default=None, metadata={
        "help": "default: 'ULMRec bundle for <dataset>: Rank NDCG@10 x, Overall NDCG@10 y'"})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(PushConfig, argv)
    if not cfg.bundle or not cfg.repo_id:
        print("error: --bundle DIR and --repo-id user/name are both required", file=sys.stderr)
        return 2
    try:
        url = push_bundle(cfg.bundle, cfg.repo_id, private=cfg.private, commit_message=cfg.commit_message)
    except (HubError, BundleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("train.push").info("pushed %s to %s", cfg.bundle, url)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
