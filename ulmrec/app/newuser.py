"""The "Your own history" tab and the /recommend endpoint: a history that is not in the table
(ulmrec.live), from the catalogue search to the ranked candidates, the index and its ladder."""
from __future__ import annotations

import html
import inspect

import gradio as gr
import pandas as pd

from ulmrec.bundle import BundleError
from ulmrec.indexing.table import parse_token_string
from ulmrec.live import MAX_ITEMS, InputError

from .logic import AppData, AppError, chips_html

SEARCH_HITS = 20
CANDIDATE_COLUMNS = ["LLM rank", "letter", "title", "LLM probability", "retriever rank"]


def search_titles(data: AppData, query: str, n: int = SEARCH_HITS) -> list[str]:
    """Catalogue titles holding every word of `query` (case-insensitive), shortest first."""
    words = (query or "").casefold().split()
    if not words:
        return []
    titles = data.bundle.items["title"].astype(str)
    hit = titles[[all(w in t.casefold() for w in words) for t in titles]]
    return sorted(dict.fromkeys(hit), key=len)[:n]


def add_item(history: str, title: str | None) -> str:
    """The history box with `title` appended as its most recent item (one item per line)."""
    lines = [x for x in (history or "").splitlines() if x.strip()]
    if title and title.strip():
        lines.append(title.strip())
    return "\n".join(lines[-MAX_ITEMS:])


def run(data: AppData, history: list[str] | str, text: str | None = None, ladder: bool = True):
    """bundle.recommend with the app's errors: AppError for anything the person can fix."""
    if isinstance(history, str):
        history = history.splitlines()
    try:
        return data.bundle.recommend(history, text, ladder=ladder)
    except (InputError, BundleError) as e:
        raise AppError(str(e)) from None


def summary_html(rec) -> str:
    """Index chips, where they came from, the LLM's own reading, collisions and notes; every
    piece of the input shown here is escaped (a title or text is text, never markup)."""
    parts = []
    if rec.index:
        parts.append(chips_html(parse_token_string(rec.index)))
        parts.append(f"<p>index from {html.escape(rec.index_source)}</p>")
    if rec.predicted_index and rec.predicted_index != rec.index:
        agree = "" if rec.agreement is None else f" — agrees on {rec.agreement:.0%} of levels"
        parts.append(f"<p>the LLM reads your items as <code>{html.escape(rec.predicted_index)}</code>"
                     f"{agree}</p>")
    if rec.collisions:
        parts.append(f"<p>full index shared with table user(s): "
                     f"{html.escape(', '.join(rec.collisions[:5]))}</p>")
    for note in rec.notes:
        parts.append(f"<p class='ulm-note'>{html.escape(note)}</p>")
    return "\n".join(parts)


def candidate_table(rec) -> pd.DataFrame:
    c = rec.candidates.sort_values("llm_rank")
    out = pd.DataFrame({"LLM rank": c["llm_rank"], "letter": c["letter"], "title": c["title"],
                        "LLM probability": c["prob"].round(4), "retriever rank": c["retriever_rank"]})
    if "fused_rank" in c:
        out["with retriever prior"] = c["fused_rank"]
    return out


def api(data: AppData):
    """The /recommend endpoint (and MCP tool): a function with its own name, typed, described."""
    def recommend(history: list[str], text: str = "", ladder: bool = True) -> dict:
        """Recommend items for a new user from their history, with their user index and its
        decoded preference; nothing is stored.

        Args:
            history: 1-20 items the user had, most recent last: item ids, asins or exact
                catalogue titles.
            text: optional review text or a sentence on what the user likes (at most 2,000
                characters); it shapes the user index.
            ladder: also decode the index level by level (one generation per level: slower).

        Returns:
            candidates (20 items with letter, title, LLM probability and ranks), index (the
            user's codes), shared (table users sharing each prefix), predicted_index (the
            LLM's reading of the history), ladder (the decoded preference per prefix), notes.
        """
        try:
            return run(data, list(history or []), text, ladder=bool(ladder)).to_dict()
        except AppError as e:
            raise gr.Error(str(e)) from None
    return recommend


def on_search(data: AppData, query: str):
    hits = search_titles(data, query)
    return gr.update(choices=hits, value=hits[0] if hits else None)


def on_recommend(data: AppData, history: str, text: str, warn=None):
    """status, summary, shared-prefix counts, candidates, ladder; `warn(message, n)` the page's
    warning (ui._warn: a toast + the status), else the message as the status alone."""
    try:
        rec = run(data, history, text)
    except AppError as e:
        if warn is not None:
            return warn(str(e), 5)
        return (f"⚠️ {e}",) + tuple(gr.skip() for _ in range(4))
    return ("", summary_html(rec), rec.shared, candidate_table(rec),
            None if rec.ladder is None else rec.ladder)


def build_tab(data: AppData) -> dict:
    """The tab's components (inside the Blocks of ui.build_demo); wire() adds the events."""
    with gr.Tab("Your own history", elem_id="own-tab"):
        gr.Markdown("Pick 1-20 items you had (oldest first, one per line: a title from the search, "
                    "an item id or an asin), add a sentence about what you like if you wish, and "
                    "get the 20 candidates the retriever finds for you, ranked by the LLM, with the "
                    "user index your items and text give and its decoded preference. Nothing you "
                    "enter is stored.")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                query = gr.Textbox(label="search the catalogue", placeholder="words of a title, then Enter",
                                   elem_id="own-search")
                hits = gr.Dropdown([], label="matching titles", elem_id="own-hits",
                                   allow_custom_value=False)
                add = gr.Button("Add to my history", elem_id="own-add")
            with gr.Column(scale=2, min_width=320):
                history = gr.Textbox(label="my history (most recent last)", lines=6,
                                     elem_id="own-history")
                text = gr.Textbox(label="optional: what you like (≤ 2,000 characters)", lines=2,
                                  elem_id="own-text")
                go = gr.Button("Recommend", variant="primary", elem_id="own-go")
        summary = gr.HTML(elem_id="own-summary")
        shared = gr.Dataframe(headers=["level", "prefix", "users sharing it"],
                              label="table users sharing each prefix of your index",
                              elem_id="own-shared", elem_classes=["ulm-table"])
        cands = gr.Dataframe(headers=CANDIDATE_COLUMNS, label="your 20 candidates by LLM rank",
                             wrap=True, elem_id="own-candidates", elem_classes=["ulm-table"],
                             max_height=2000)                 # all 20 rows, no inner scroll box
        ladder = gr.Dataframe(headers=["level", "prefix", "users sharing it", "generated preference"],
                              label="your index decoded level by level", wrap=True,
                              elem_id="own-ladder", elem_classes=["ulm-table"], max_height=2000)
    return dict(query=query, hits=hits, add=add, history=history, text=text, go=go,
                summary=summary, shared=shared, cands=cands, ladder=ladder)


def wire(demo: gr.Blocks, data: AppData, c: dict, status, warn) -> None:
    """The tab's events and the /recommend endpoint (after every tab is built: an event or
    endpoint declared between two tabs would split the row of tabs)."""
    hidden = {"api_visibility": "private"}
    query, hits, add, history, text, go = (c[k] for k in ("query", "hits", "add", "history", "text", "go"))
    summary, shared, cands, ladder = (c[k] for k in ("summary", "shared", "cands", "ladder"))
    # on Enter only: a search per keystroke would race its own answers into the list
    query.submit(lambda q: on_search(data, q), query, hits, **hidden)
    add.click(add_item, [history, hits], history, **hidden)
    go.click(lambda h, t: on_recommend(data, h, t, warn), [history, text],
             [status, summary, shared, cands, ladder], concurrency_id="model", **hidden)
    recommend = api(data)
    dep = gr.api(recommend, api_name="recommend", concurrency_id="model")
    # gr.api labels its inputs and output '1st', '2nd', …: the API page should say what they are
    for block, name in zip(dep["inputs"], inspect.signature(recommend).parameters):
        demo.blocks[block].label = name
    demo.blocks[dep["outputs"][0]].label = "recommendation"
