"""Reader for the ULMRec authors' released split (Palpitate18/ULMRec, converted to JSON).

Folder layout: sequences.jsonl.gz (user, reviewerID, train, val, test), items.jsonl.gz
(item, asin, title), preferences.json.gz (reviewerID → GPT-3.5 preference sentence),
user_index.json.gz (reviewerID → " <a_1> <b_2> <c_3> <d_4>"). There is no review text,
rating or timestamp: each interaction's `text` is the item title, marked 'title_proxy'.

Each user has exactly one val and one test item; a longer list is a different split, not a
line to trim, so it stops the load. The authors' preferences and user index were both built
from *all* of a user's reviews, so whatever reads them is flagged leak-prone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .amazon import (DataError, LineIssue, ReadReport, _issue, clean_title, iter_records,
                     read_text, require_records)

# The note every stage that shows the authors' user index to a model carries (run notes,
# results), worded like the one for the authors' preferences (ulmrec.ranker).
RELEASE_INDEX_NOTE = ("user index: the authors' released index, built from ALL of a user's "
                      "reviews (leak-prone: it may carry validation/test items)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object mapping reviewerID to text")
    return data


def _one_item(rec: dict, key: str, path: Path, lineno: int) -> int:
    """The single val/test item of a sequence line; a longer list is a DataError."""
    items = rec[key]
    if not isinstance(items, list):
        raise TypeError(f"'{key}' is {type(items).__name__}, not a one-item list")
    if len(items) > 1:
        raise DataError(f"{path}:{lineno}: user {rec.get('user')!r} ({rec.get('reviewerID')}): "
                        f"'{key}' holds {len(items)} items; the release split has exactly one "
                        f"{key} item per user, and taking the first would drop the rest")
    if not items:
        raise ValueError(f"'{key}' is empty")
    return int(items[0])


def read_release(folder: Path, strict: bool = False, allow_truncated: bool = False):
    """Returns (users, items, interactions, reports) in the same schema as `build_split`."""
    folder = Path(folder)
    reports = {"items": ReadReport(), "sequences": ReadReport()}

    item_rows = []
    path = folder / "items.jsonl.gz"
    for lineno, rec in iter_records(path, reports["items"], strict, allow_truncated):
        try:
            item_rows.append({"item": int(rec["item"]), "asin": str(rec["asin"]),
                              "title": clean_title(rec["title"])})
            reports["items"].kept += 1
        except (KeyError, TypeError, ValueError) as err:
            _issue(reports["items"], LineIssue(str(path), lineno, f"bad item record: {err}"), strict)
    require_records(path, reports["items"])
    items = pd.DataFrame(item_rows, columns=["item", "asin", "title"])
    items = items.drop_duplicates("item").sort_values("item").reset_index(drop=True)
    items["title_source"] = "title"
    known = set(items["item"].tolist())

    users, inter = [], []
    path = folder / "sequences.jsonl.gz"
    for lineno, rec in iter_records(path, reports["sequences"], strict, allow_truncated):
        try:
            user = int(rec["user"])
            seq = [int(i) for i in rec["train"]] + [_one_item(rec, k, path, lineno)
                                                    for k in ("val", "test")]
            unknown = [i for i in seq if i not in known]
            if unknown:
                raise ValueError(f"item id(s) {unknown[:3]} not in items.jsonl.gz")
            if len(seq) < 3:
                raise ValueError("fewer than 3 interactions")
        except DataError:  # a ValueError too, but one that stops the load
            raise
        except (KeyError, TypeError, ValueError, IndexError) as err:
            _issue(reports["sequences"], LineIssue(str(path), lineno, f"bad sequence: {err}"), strict)
            continue
        users.append({"user": user, "reviewerID": str(rec["reviewerID"])})
        n = len(seq)
        for pos, item in enumerate(seq):
            split = "test" if pos == n - 1 else "val" if pos == n - 2 else "train"
            inter.append((user, item, pos, split))
        reports["sequences"].kept += 1
    require_records(path, reports["sequences"])

    users = pd.DataFrame(users, columns=["user", "reviewerID"]).sort_values("user")
    users = users.reset_index(drop=True)
    interactions = pd.DataFrame(inter, columns=["user", "item", "position", "split"])
    titles = items.set_index("item")["title"]
    interactions["rating"] = np.nan
    interactions["timestamp"] = pd.array([pd.NA] * len(interactions), dtype="Int64")
    interactions["text"] = interactions["item"].map(titles).fillna("")
    interactions["text_kind"] = "title_proxy"

    prefs = folder / "preferences.json.gz"
    if prefs.exists():
        users["preference"] = users["reviewerID"].map(_read_json(prefs))
    index = folder / "user_index.json.gz"
    if index.exists():
        users["release_index"] = users["reviewerID"].map(_read_json(index)).str.strip()
    return users, items, interactions, reports
