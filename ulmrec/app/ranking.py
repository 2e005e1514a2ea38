"""Ranking one user's 20 candidates: the verbalizer chart, the rank table and the user's metrics."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..metrics import metrics_from_ranks, target_ranks
from .logic import AppData, AppError, warm

BAR, TARGET = "#4c78a8", "#e4572e"
KS = (5, 10)


def rank_user(data: AppData, user: int, no_history: bool = False) -> pd.DataFrame:
    """letter, item, title, score, prob, retriever_rank, llm_rank, is_target (bundle.rank, batch 1)."""
    if user not in data.test_candidates:
        raise AppError(f"user {user} has no test candidates in this bundle")
    warm(data)
    return data.bundle.rank([user], no_history=no_history, batch_size=1)[0]


def short(title: str, n: int = 30) -> str:
    return title if len(title) <= n else title[: n - 1].rstrip() + "…"


def tick_labels(frame: pd.DataFrame) -> list[str]:
    """'A · short title' per candidate: the letter the LLM answers with, first."""
    return [f"{letter} · {short(str(t))}" for letter, t in zip(frame["letter"], frame["title"])]


def prob_chart(frame: pd.DataFrame, title: str = "") -> go.Figure:
    """Horizontal bars of the verbalizer probability, candidates in retriever order (A on
    top), the ground truth in its own colour and legend entry."""
    labels = tick_labels(frame)
    fig = go.Figure()
    for is_target, name, colour in ((False, "candidate", BAR), (True, "ground truth", TARGET)):
        part = frame["is_target"] == is_target
        if not part.any():
            continue
        fig.add_trace(go.Bar(
            x=frame.loc[part, "prob"], y=[lb for lb, p in zip(labels, part) if p], orientation="h",
            name=name, marker_color=colour,
            customdata=frame.loc[part, ["llm_rank", "retriever_rank"]].to_numpy(),
            hovertemplate="%{y}<br>p = %{x:.4f}<br>LLM rank %{customdata[0]}, "
                          "retriever rank %{customdata[1]}<extra></extra>"))
    fig.update_layout(
        title=title, height=560, margin={"l": 10, "r": 10, "t": 40 if title else 10, "b": 30},
        xaxis_title="verbalizer probability", bargap=0.25, legend={"orientation": "h", "y": -0.08},
        yaxis={"categoryorder": "array", "categoryarray": labels, "autorange": "reversed",
                   "tickfont": {"family": "monospace", "size": 11}})
    return fig


def rank_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Candidates by LLM rank, the retriever's rank beside it."""
    t = frame.sort_values("llm_rank")
    return pd.DataFrame({"LLM rank": t["llm_rank"], "retriever rank": t["retriever_rank"],
                         "letter": t["letter"], "title": t["title"],
                         "probability": t["prob"].astype(float).round(4),
                         "target": np.where(t["is_target"], "✓", "")})


def user_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """This user's Recall/MRR/NDCG@5,10 from the target's pessimistic LLM rank, and from the
    retriever's order; a target outside the candidates scores 0 (the Overall view)."""
    hit = np.flatnonzero(frame["is_target"].to_numpy())
    pos = int(hit[0]) if len(hit) else -1
    llm = target_ranks(frame["prob"].to_numpy()[None, :], [pos])
    retr = np.array([pos + 1.0 if pos >= 0 else np.inf])
    rows = []
    for system, ranks in (("ULMRec (LLM)", llm), ("retriever", retr)):
        m = metrics_from_ranks(ranks, KS)
        rows.append({"system": system, "target rank": "—" if np.isinf(ranks[0]) else int(ranks[0]),
                     **{f"{name}@{k}": round(m[f"{name}@{k}"], 4)
                        for k in KS for name in ("MRR", "NDCG", "Recall")}})
    return pd.DataFrame(rows)


def rank_view(data: AppData, user: int, no_history: bool = False):
    """(frame, chart, table, metrics) for one user."""
    frame = rank_user(data, user, no_history)
    mode = "ULMRec-uid: index only, no history" if no_history else "index + history"
    missed = "" if frame["is_target"].any() else " · target not retrieved"
    return (frame, prob_chart(frame, f"user #{user} ({mode}){missed}"), rank_table(frame),
            user_metrics(frame))
