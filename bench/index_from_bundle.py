"""Unpack the user index a bundle serves into a train.index run folder, so that a ranker can be
retrained on exactly the index (and the decode adapter) the bundle already carries.

    python bench/index_from_bundle.py --bundle assets/games --dataset games --out index-served
    python -m train.finetune ... --index-kind pid --index-run index-served

The RQ-VAE is trained on a CPU thread whose float sums are not bit-stable across machines, so
rerunning `python -m train.index` gives another (equally valid) index: a ranker trained on it
would not match the bundle's decoder. Writes runs/<dataset>/<out>/{user_index.parquet,
model.safetensors, summary.json} from the bundle's user_index.parquet and indexer/.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/index_from_bundle.py`

from ulmrec.data import load_dataset  # noqa: E402
from ulmrec.paths import atomic_dir, repo_path, runs_root  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="bundle folder (e.g. assets/games)")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--out", default="index-served", help="runs/<dataset>/<out>")
    args = ap.parse_args(argv)

    bundle = repo_path(args.bundle)
    table = pd.read_parquet(bundle / "user_index.parquet")
    spec = json.loads((bundle / "indexer" / "indexer.json").read_text())
    if spec["config"].get("kind") != "pid":
        raise SystemExit(f"{bundle}: its index is '{spec['config'].get('kind')}', not a P-ID index")
    ds = load_dataset(args.dataset)
    users = ds.users[["user", "reviewerID"]].astype({"reviewerID": str})
    merged = users.merge(table.astype({"reviewerID": str}), on="reviewerID", how="inner")
    if len(merged) != len(users):
        raise SystemExit(f"{bundle}: its index covers {len(merged)} of {args.dataset}'s "
                         f"{len(users)} users: not this dataset's bundle")
    merged = merged.sort_values("user").assign(kind="pid")
    tensors = load_file(str(bundle / "indexer" / "indexer.safetensors"))
    tensors.pop("new_user_query", None)        # export adds it; train.index does not save it
    summary = {"dataset": args.dataset, "kind": "pid", "settings": {**spec["config"], "out": args.out},
               "leak_prone": bool(spec.get("leak_prone")), "from_bundle": bundle.name,
               "reviews": {"text_kind": spec.get("text_kind", "")}}

    def fill(tmp: Path) -> None:
        merged[["user", "reviewerID", "kind", "a", "b", "c", "d", "index"]].to_parquet(
            tmp / "user_index.parquet", index=False)
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))

    atomic_dir(runs_root() / args.dataset / args.out, fill)
    print(f"{len(merged)} users' index from {bundle.name} → runs/{args.dataset}/{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
