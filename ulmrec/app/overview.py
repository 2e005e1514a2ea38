"""The Overview tab: dataset statistics, the evaluation table, codebook usage, bundle notes."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .logic import CODEBOOK_SIZE, AppData

COLUMNS = [f"{m}@{k}" for k in (5, 10) for m in ("Recall", "NDCG", "MRR")]

GLOSSARY = """\
**How to read the numbers.** Each test user has one *next item* (the one they really bought
next). A model's list puts it at some *rank* (1 = first).

- **Recall@k** (also **HR@k**, hit rate): 1 if the next item is in the top k, else 0,
  averaged over users. *R@10 = 0.6: for 60% of users it is in the top 10.*
- **NDCG@k**: like Recall@k but a hit counts more the higher it is: 1 at rank 1, 0.63 at
  rank 2, 0.5 at rank 3, 0.39 at rank 10, 0 past k.
- **MRR@k**: 1/rank when the rank is at most k, else 0 (rank 2 → 0.5).
- **Rank** view: only the users whose next item is among the retriever's 20 candidates
  (the LLM can only re-order those). **Overall** view: every user, a missed item scoring 0.
- **Ties** count against the model: an item with the same score as the next item counts as
  ranked above it.
- **ULMRec**: the LLM ranker with the user index and six training tasks; **ULMRec, index
  only**: the same model without the user's history (the paper's ULMRec-uid); **LlamaRec**:
  the LLM trained on the next-item task alone, without an index; **retriever**: the
  candidates in the retriever's own order; **untuned LLM**: the backbone before training;
  **+ retriever prior**: the LLM's scores blended with the retriever's order, the weight
  fitted on validation users.
- **Letters**: the 20 candidates are labelled A–T in the prompt; the LLM's probability of
  answering each letter is that candidate's score.
- **User index**: four codes `<a_…><b_…><c_…><d_…>` learned from a user's reviews; users
  with similar tastes share the first codes. *Index kind* says where they come from:
  **pid**, learned by this project from training reviews only; **release**, the paper
  authors' published user indices.
- **Leak-prone**: an input built from all of a user's reviews, the held-out ones included
  (the reviews of the very items the models must find), so it can leak the answer. The
  authors' published indices were built from preference text extracted that way.
"""

INDEX_KINDS = {
    "pid": "codes this project learned from the users' training reviews only",
    "release": "the paper authors' published user indices (leak-prone: see the glossary)",
    "nid": "the user's numeric id, no codes",
    "oid": "the user's reviewerID, no codes",
}


def dataset_markdown(data: AppData) -> str:
    m = data.bundle.manifest
    ds = m.dataset
    users, items, inter = ds.get("users"), ds.get("items"), ds.get("interactions")
    sparsity = (f"{1 - inter / (users * items):.2%}" if users and items and inter else "—")
    retrieved = (f"{data.users['retrieved'].mean():.1%} of "
                 f"{int(data.users['has_candidates'].sum())}")
    rows = [("dataset", ds.get("name", "—")), ("users", users), ("items", items),
            ("interactions", inter), ("avg. length", f"{inter / users:.2f}" if users and inter else "—"),
            ("sparsity", sparsity),
            ("users with retrieved target", retrieved),
            ("backbone", m.backbone.get("id", "—")),
            ("index kind", index_kind_text(m.index_kind)),
            ("retriever", m.retriever or "—"),
            ("preferences", m.preference_source or "—"),
            ("data", "carried in the bundle" if m.includes_data else "joined from ULMREC_DATA")]
    lines = [f"| {k} | {v if v is not None else '—'} |" for k, v in rows]
    return "| statistic | value |\n|---|---|\n" + "\n".join(lines)


def index_kind_text(kind) -> str:
    """'release' alone tells a visitor nothing: the kind with what it means."""
    if kind is None:
        return "—"
    return f"{kind}: {INDEX_KINDS[kind]}" if kind in INDEX_KINDS else str(kind)


def system_label(name: str, bundle_run: str | None = None) -> str:
    """A results key as a reader names it: run names ('demo', 'demo+uid') become ULMRec /
    LlamaRec, the baselines say what they are."""
    prior = " + retriever prior"             # train.evaluate's fused row for a run
    if name.endswith(prior):
        return system_label(name[: -len(prior)], bundle_run) + prior
    base, uid = (name[:-4], True) if name.endswith("+uid") else (name, False)
    low = base.lower()
    if low.startswith("retriever"):
        model = re.search(r"\((\w+)\)", base)
        return f"retriever ({model.group(1).upper().replace('REC', 'Rec') if model else 'its own'} order)"
    if low.startswith("backbone"):
        return "untuned LLM"
    label = "LlamaRec" if "llamarec" in low else "ULMRec"
    return label + (", index only (no history)" if uid else "")


def system_labels(names, bundle_run: str | None = None) -> dict[str, str]:
    """system_label for each name; two runs that would read the same keep their run name."""
    labels = {n: system_label(n, bundle_run) for n in names}
    seen = list(labels.values())
    own = lambda n: n.removesuffix(" + retriever prior").removesuffix("+uid") == bundle_run  # noqa: E731
    return {n: (lb if seen.count(lb) == 1 or own(n) else f"{lb} [{n}]") for n, lb in labels.items()}


def results_table(metrics: dict, bundle_run: str | None = None) -> pd.DataFrame:
    """One Rank and one Overall row per evaluated system (paper Table 2's two views)."""
    rows = []
    results = metrics.get("results") or {}
    labels = system_labels(results, bundle_run)
    for system, res in results.items():
        for view in ("rank", "overall"):
            if view in res:
                rows.append({"system": labels[system], "view": view.capitalize(),
                             **{c: round(float(res[view].get(c, np.nan)), 4) for c in COLUMNS}})
    table = pd.DataFrame(rows, columns=["system", "view", *COLUMNS])
    return table.sort_values("view", kind="stable", key=lambda v: v != "Rank").reset_index(drop=True)


BEST = "font-weight: bold; background-color: #d9f2d9"


def results_styled(table: pd.DataFrame):
    """The results table with each column's best value in bold, per view (Rank rows are
    compared with Rank rows only)."""
    def best(col: pd.Series):
        out = [""] * len(col)
        for view in table["view"].unique():
            part = col[table["view"] == view]
            if part.nunique() < 2:
                continue
            for i in part.index[part == part.max()]:
                out[table.index.get_loc(i)] = BEST
        return out
    return table.style.apply(best, subset=COLUMNS).format(precision=4, subset=COLUMNS)


def _no_machine_path(command: str) -> str:
    """A command as run from the repository root: absolute paths lose their machine prefix
    ('/home/x/ulmrec/runs/a.yaml' → 'runs/a.yaml'; other absolute paths keep their name)."""
    def rel(m):
        path = m.group(0)
        hit = re.search(r"/((?:runs|configs|results|assets|cache)/\S*)$", path)
        return hit.group(1) if hit else path.rsplit("/", 1)[-1]
    return re.sub(r"(?<![\w.])/[^\s'\"]+", rel, command)


def _best_cells(table: pd.DataFrame) -> dict[str, int]:
    """Per system, how many (view, column) cells hold the best value, and the number of
    cells compared under the key '' (a column where every row ties is not compared)."""
    wins = {"": 0}
    for view in table["view"].unique():
        part = table[table["view"] == view]
        for col in COLUMNS:
            if part[col].nunique() < 2:
                continue
            wins[""] += 1
            for system in part.loc[part[col] == part[col].max(), "system"]:
                wins[system] = wins.get(system, 0) + 1
    return wins


def results_verdict(table: pd.DataFrame) -> str:
    """Who scores best, in one plain sentence: the bold cells alone leave a visitor to find
    out that the retriever's own order beats the LLM, under a title that promises the LLM."""
    wins = _best_cells(table)
    total = wins.pop("")
    if not total:
        return ""
    top = max(wins, key=lambda k: (wins[k], not k.startswith("retriever")))
    of = "every one of the metrics" if wins[top] == total else f"{wins[top]} of the {total} metrics"
    if top.startswith("retriever"):
        return (f"On these test users the retriever's own order scores best on {of}: here the "
                "LLM does not rank the candidates better than the retriever that proposed them.")
    return f"{top} scores best on {of}."


def results_caption(metrics: dict, table: pd.DataFrame | None = None) -> str:
    n = metrics.get("test_users")
    verdict = results_verdict(table) if table is not None else ""
    return (f"How to read it: one row per system and view, on {n if n is not None else 'the'} "
            "sampled test users; higher is better, the best value per column and view is in "
            "bold. **Rank**: users whose next item was among the retriever's 20; **Overall**: "
            "all users, a missed item scoring 0." + (f" {verdict}" if verdict else ""))


def reproduce_markdown(data: AppData) -> str:
    """The commands behind the page, for whoever wants to rerun it (run from the repository
    root), kept out of the visitor's way in a collapsed accordion."""
    cmd = data.bundle.metrics.get("command")
    lines = []
    if cmd:
        lines.append(f"- the evaluation table: `{_no_machine_path(cmd)}`")
    lines += ["- serve a demo: `python app.py --bundle <folder or Hub repo>`, or `make demo "
              "DEMO=games` / `make demo DEMO=gift-cards`",
              "- serve the float32 ranker the table evaluates: `python app.py` without `--int8` "
              "or `--bf16`"]
    return "\n".join(lines)


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
        fig.add_annotation(text=f"index kind '{data.bundle.manifest.index_kind}': no codes",
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


def _same_source(note: str) -> bool:
    """A fallback note that falls back to what was asked for ('extractive' texts missing,
    showing extractive summaries) says nothing and reads as a contradiction: dropped."""
    m = re.match(r"preferences: '(\w+)' texts not on this machine; showing (\w+)", note)
    return bool(m) and m.group(1) == m.group(2)


LEAK = re.compile(r"\s*\(leak-prone: [^)]*\)")
LEAK_PLAIN = ", the held-out ones included, so it can leak the answer (leak-prone)"


def _plain(note: str, shown: bool = True) -> str:
    said = (r"the preference texts shown come from the '\1' preferences stage" if shown else
            r"the LLM's prompts held the '\1' preference texts")
    note = LEAK.sub(LEAK_PLAIN, note)
    return re.sub(r"^preferences: '(\w+)' preferences stage output$", said, note)


def notes_markdown(data: AppData) -> str:
    """The bundle's notes in two groups: what this app shows, and how the evaluation ran
    (each note once, with the systems it applies to when not all of them)."""
    shown = [_plain(n) for n in data.bundle.notes if not _same_source(n)]
    results = data.bundle.metrics.get("results") or {}
    run = data.bundle.manifest.run
    labels = system_labels(results, run)
    by_note: dict[str, list[str]] = {}
    for system, res in results.items():
        for n in res.get("notes", []):
            by_note.setdefault(_plain(n, shown=False), []).append(labels[system])
    llms = {lb for k, lb in labels.items() if not k.startswith("retriever")}
    evaluated = [n + ("" if set(systems) >= llms else f" ({', '.join(systems)})")
                 for n, systems in by_note.items()]
    parts = []
    if shown:
        parts.append("**This app's data**\n" + "\n".join(f"- {n}" for n in shown))
    if evaluated:
        parts.append("**The evaluation**\n" + "\n".join(f"- {n}" for n in evaluated))
    return "\n\n".join(parts) if parts else "No notes."
