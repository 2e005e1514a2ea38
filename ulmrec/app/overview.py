"""The Overview tab: dataset statistics, the evaluation table, codebook usage, bundle notes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .logic import CODEBOOK_SIZE, AppData

COLUMNS = [f"{m}@{k}" for k in (5, 10) for m in ("Recall", "NDCG", "MRR")]


def dataset_markdown(data: AppData) -> str:
    m = data.bundle.manifest
    ds = m.get("dataset", {})
    users, items, inter = ds.get("users"), ds.get("items"), ds.get("interactions")
    sparsity = (f"{1 - inter / (users * items):.2%}" if users and items and inter else "—")
    retrieved = (f"{data.users['retrieved'].mean():.1%} of "
                 f"{int(data.users['has_candidates'].sum())}")
    rows = [("dataset", ds.get("name", "—")), ("users", users), ("items", items),
            ("interactions", inter), ("avg. length", f"{inter / users:.2f}" if users and inter else "—"),
            ("sparsity", sparsity),
            ("users with retrieved target", retrieved),
            ("backbone", m.get("backbone", {}).get("id", "—")),
            ("index kind", m.get("index_kind", "—")), ("retriever", m.get("retriever", "—")),
            ("preferences", m.get("preference_source", "—")), ("run", m.get("run", "—")),
            ("data", "carried in the bundle" if m.get("includes_data") else "joined from ULMREC_DATA")]
    lines = [f"| {k} | {v if v is not None else '—'} |" for k, v in rows]
    return "| statistic | value |\n|---|---|\n" + "\n".join(lines)


def results_table(metrics: dict) -> pd.DataFrame:
    """One Rank and one Overall row per evaluated system (paper Table 2's two views)."""
    rows = []
    for system, res in (metrics.get("results") or {}).items():
        for view in ("rank", "overall"):
            if view in res:
                rows.append({"system": system, "view": view.capitalize(),
                             **{c: round(float(res[view].get(c, np.nan)), 4) for c in COLUMNS}})
    return pd.DataFrame(rows, columns=["system", "view", *COLUMNS])


def results_caption(metrics: dict) -> str:
    n = metrics.get("test_users")
    cmd = metrics.get("command")
    return (f"Test users: {n if n is not None else '—'}. Rank: users whose target was retrieved; "
            "Overall: all users, a missed target scoring 0." + (f"\n\n`{cmd}`" if cmd else ""))


def codebook_usage(data: AppData) -> pd.DataFrame:
    """Per level: distinct codes used and the most users on one code."""
    rows = []
    for lv, letter in enumerate(data.levels):
        counts = np.bincount(data.codes[:, lv], minlength=CODEBOOK_SIZE)
        rows.append({"level": letter, "codes used": int((counts > 0).sum()),
                     "max users per code": int(counts.max())})
    return pd.DataFrame(rows, columns=["level", "codes used", "max users per code"])


def codebook_chart(data: AppData) -> go.Figure:
    """Left: distinct codes used per level. Right: histogram of users per used code."""
    titles = ("distinct codes used per level", "users per code (used codes)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    if not data.levels:
        fig.add_annotation(text=f"index kind '{data.bundle.manifest.get('index_kind')}': no codes",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        return fig
    usage = codebook_usage(data)
    fig.add_trace(go.Bar(x=usage["level"], y=usage["codes used"], name="codes used",
                         marker_color="#4c78a8", showlegend=False), row=1, col=1)
    for lv, letter in enumerate(data.levels):
        counts = np.bincount(data.codes[:, lv])
        fig.add_trace(go.Histogram(x=counts[counts > 0], name=f"level {letter}", opacity=0.6,
                                   xbins={"start": 0.5, "size": 1}), row=1, col=2)
    fig.update_layout(barmode="overlay", height=360, margin={"l": 10, "r": 10, "t": 40, "b": 30})
    fig.update_xaxes(title_text="level", row=1, col=1)
    fig.update_xaxes(title_text="users on one code", row=1, col=2)
    fig.update_yaxes(title_text="codes", row=1, col=2)
    return fig


def notes_markdown(data: AppData) -> str:
    notes = list(data.bundle.notes)
    for res in (data.bundle.metrics.get("results") or {}).values():
        notes += [n for n in res.get("notes", []) if n not in notes]
    return "\n".join(f"- {n}" for n in notes) if notes else "No notes."
