"""The user-index table and the index-token vocabulary the LLM stage adds.

Index kinds (paper Fig. 9): 'pid' personalised codes `<a_12><b_7><c_201><d_33>`;
'nid' the numeric user id ("17"); 'oid' the original reviewerID ("A1GNYV0RA0EQSS").
Level i uses letter chr(ord('a') + i), so 4 levels × 256 codes give `<a_0>`..`<d_255>`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from ..paths import atomic_write

INDEX_KINDS = ("pid", "nid", "oid")
_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def level_letter(level: int) -> str:
    if not 0 <= level < 26:
        raise ValueError(f"level {level}: only 26 levels have a letter")
    return chr(ord("a") + level)


def index_vocab(levels: int = 4, codebook_size: int = 256) -> list[str]:
    """Every index token, level by level: ['<a_0>', ..., '<a_255>', '<b_0>', ..., '<d_255>']."""
    return [f"<{level_letter(lv)}_{k}>" for lv in range(levels) for k in range(codebook_size)]


def token_string(codes) -> str:
    return "".join(f"<{level_letter(lv)}_{int(c)}>" for lv, c in enumerate(codes))


def parse_token_string(s: str) -> list[int]:
    """'<a_1> <b_2>...' (spaces allowed, as in the authors' release) → [1, 2, ...]."""
    found = _TOKEN.findall(s or "")
    letters = [f for f, _ in found]
    if not found or letters != [level_letter(i) for i in range(len(found))]:
        raise ValueError(f"not an index token string: {s!r}")
    return [int(c) for _, c in found]


def build_table(users: pd.DataFrame, kind: str, codes: np.ndarray | None = None) -> pd.DataFrame:
    """users (user, reviewerID) sorted by user → table user, reviewerID, kind, [a..], index."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: expected one of {INDEX_KINDS}")
    users = users.sort_values("user").reset_index(drop=True)
    out = pd.DataFrame({"user": users["user"].astype("int64"),
                        "reviewerID": users["reviewerID"].astype(str), "kind": kind})
    if kind == "pid":
        if codes is None or len(codes) != len(users):
            raise ValueError("pid table needs codes with one row per user")
        for lv in range(codes.shape[1]):
            out[level_letter(lv)] = codes[:, lv].astype("int64")
        out["index"] = [token_string(row) for row in codes.tolist()]
    elif kind == "nid":
        out["index"] = out["user"].astype(str)
    else:
        out["index"] = out["reviewerID"]
    if out["index"].duplicated().any():
        dup = out.loc[out["index"].duplicated(keep=False), "index"].iloc[0]
        raise ValueError(f"{kind} index {dup!r} is shared by several users")
    return out


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[dict]:
    """Per level: distinct codes used, fraction of the codebook, perplexity of code frequencies."""
    out = []
    for lv in range(codes.shape[1]):
        counts = np.bincount(codes[:, lv], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out.append({"level": level_letter(lv), "used": int((counts > 0).sum()),
                    "of": codebook_size, "fraction": round(float((counts > 0).mean()), 4),
                    "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 1),
                    "max_users_per_code": int(counts.max())})
    return out


def release_codes(users: pd.DataFrame) -> np.ndarray | None:
    """The authors' released index as codes [U, L] (games/beauty), or None."""
    if "release_index" not in users.columns:
        return None
    col = users.sort_values("user")["release_index"]
    if col.isna().any():
        return None
    return np.array([parse_token_string(s) for s in col], dtype=np.int64)


def write_table(table: pd.DataFrame, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "user_index.parquet", lambda p: table.to_parquet(p, index=False))
    records = table.to_dict(orient="records")
    atomic_write(folder / "user_index.json",
                 lambda p: Path(p).write_text(json.dumps(records, indent=0)))


def read_table(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(folder) / "user_index.parquet")


