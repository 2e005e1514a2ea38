"""The whole-catalogue mode: LC-Rec generates item indices for a user's history, no retriever.

Shown when the bundle carries an LC-Rec part (train.export --lcrec). The beam score is the
item's summed index-token log-probability (the model's log-probability of writing that
item's index); it ranks items within one user only.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .logic import AppData, AppError

TOPN = 10
COLUMNS = ["rank", "item index", "title", "log-probability", "in retriever's 20", "target"]


def lcrec_ready(data: AppData):
    """(model, tok) of the LC-Rec part, loaded once; AppError when the bundle has none."""
    if not data.bundle.has_lcrec:
        raise AppError("this bundle has no LC-Rec part: export it with `python -m train.export "
                       "--lcrec runs/<dataset>/lcrec` to recommend from the whole catalogue")
    with data.lock:
        return data.bundle.served_lcrec()


def catalogue_view(data: AppData, user: int, n: int = TOPN) -> tuple[str, pd.DataFrame]:
    """(summary markdown, table of the generated items) for one user."""
    lcrec_ready(data)
    frame = data.bundle.recommend_catalogue(user, n=n)
    part = data.bundle.manifest.lcrec
    hit = frame.index[frame["is_target"]]
    target = int(data.bundle.users.set_index("user").at[user, "target"])
    found = (f"ground truth at rank **{int(frame.loc[hit[0], 'rank'])}**" if len(hit) else
             f"ground truth (*{html.escape(str(data.titles.get(target, target)))}*) not in the top {n}")
    summary = (f"LC-Rec generated {len(frame)} items from the {part['items']} of the catalogue for user "
               f"#{user}, history items excluded · {found} · "
               f"{int(frame['in_candidates'].sum())} of them are also in the retriever's 20.\n\n"
               f"LC-Rec on {part['users']} {part['split']} users: HR@10 {part['metrics']['HR@10']:.4f}, "
               f"NDCG@10 {part['metrics']['NDCG@10']:.4f} (full ranking).")
    table = pd.DataFrame(dict(zip(COLUMNS, (
        frame["rank"], frame["index"], frame["title"], frame["score"].astype(float).round(3),
        np.where(frame["in_candidates"], "✓", ""), np.where(frame["is_target"], "✓", "")))))
    return summary, table
