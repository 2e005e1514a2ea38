"""The Gradio page: its layout, and the events that wire it to ulmrec.app.handlers.

The page's own plumbing (looking a user up, filters, Random, page load) is private; the
actions are the named API endpoints of ulmrec.app.endpoints.
"""
from __future__ import annotations

from functools import partial

import gradio as gr

from . import catalogue, endpoints, logic, newuser, overview, ranking
from .handlers import (  # noqa: F401  (the handlers, importable from here as before)
    USER_OUTPUTS, _warn, history_panel, on_catalogue, on_decode, on_filter, on_ladder,
    on_random, on_rank, on_user, rank_if_loaded)
from .logic import AppData

CSS = """
.ulm-chips {display:flex; gap:.5rem; flex-wrap:wrap; margin:.25rem 0}
.ulm-chip {font-family:monospace; font-size:1.1rem; padding:.3rem .7rem; border-radius:1rem;
           color:#fff; display:inline-flex; gap:.4rem; align-items:baseline}
.ulm-chip small {opacity:.8; font-size:.75rem; text-transform:uppercase}
.ulm-l0 {background:#4c78a8} .ulm-l1 {background:#72b7b2} .ulm-l2 {background:#f58518}
.ulm-l3 {background:#e45756}
.ulm-caption, .ulm-caption p {font-size:.85rem; opacity:.8; margin:0}
#status {display:none}
/* a header reads in full: the column widths (ui.widths) leave each one room on one line */
.ulm-table th .header-content span {white-space: nowrap; word-break: keep-all}
/* phones: tables keep readable columns and scroll sideways instead of one letter per line */
@media (max-width: 700px) {
  .ulm-table table {min-width: 640px}
  .ulm-table .table-wrap, .ulm-table .table-container {overflow-x: auto}
}
"""

INTRO = """\
**What this is.** A recommender that guesses what a shopper buys next. First a small sequence
model, the **retriever** ({retriever}), reads the shopper's past purchases and proposes 20
candidate items. Each shopper also has a **user index**: four short codes such as
`<a_12><b_7><c_201><d_33>`, learned from their reviews, so that shoppers with similar tastes
share their first codes. Then a language model, the **LLM** ({backbone}, fine-tuned), reads
the index, the titles of the shopper's recent purchases and the 20 candidates, each labelled
with a **letter** A–T; how likely it is to answer each letter is that candidate's score.
Below: one shopper, their 20 candidates as ranked by the LLM, and the item they really
bought next in orange."""

CAPTIONS = {
    "chart": "How to read it: one bar per candidate, A (the retriever's first pick) on top; the "
             "longer the bar, the likelier the LLM picks it. Orange: the item the user really "
             "bought next. Hover a bar for its full title and both ranks.",
    "metrics": "How to read it: where the real next item landed (target rank, 1 = first) and "
               "the scores that follow from it, for ULMRec, for ULMRec + retriever prior (where "
               "the demo has one) and for the retriever's own order; "
               "higher is better (lower for the rank), the better value in bold. See *What the "
               "numbers mean*.",
    "table": "How to read it: the 20 candidates, the LLM's favourite first; 'retriever rank' is "
             "where the retriever had put it, 'LLM + prior rank' the blend of both; ✓ marks the "
             "item the user really bought next.",
    "history": "How to read it: the user's past items, most recent first; ▸ marks the ones "
               "the LLM sees in its prompt.",
    "prefixes": "How to read it: row a is the user's first code, row d the whole index; "
                "'users sharing it' counts users whose index starts the same way (fewer at "
                "each level: the codes narrow the taste down).",
    "near": "How to read it: the users whose index starts most like this one's (first row: "
            "this user), with their preference texts side by side: similar codes should read "
            "as similar tastes.",
    "ladder": "How to read it: the LLM writes a preference text from the first code alone, "
              "then the first two, … the whole index: the text should grow more specific.",
    "decoded": "Type any prefix, e.g. `<a_12>` or `<a_12><b_3>`, to read what the LLM "
               "associates with it.",
    "catalogue": "How to read it: the 10 items LC-Rec writes for this user, best first; "
                 "log-probability closer to 0 = more confident; 'in retriever's 20' says "
                 "whether the retriever proposed it too; ✓ marks the real next item.",
    "dataset": "How to read it: the bundle's dataset and the parts this demo was built from.",
    "codebook": "How to read it: left, how many of the 256 codes each level uses; right, how "
                "many users share one code (few users per code at level d: indices are unique).",
    "usage": "How to read it: per level, the codes in use and the most users on one code.",
}


def caption(key: str):
    return gr.Markdown(CAPTIONS[key], elem_classes=["ulm-caption"], elem_id=f"cap-{key}")


# Tables show every row (no inner scroll box: the 20th candidate, the last rung) and every
# header in full: short columns take their natural width, text columns a fixed one, so a
# header is never squeezed under its text; narrower screens scroll the table sideways.
FULL_HEIGHT = 4000


def widths(columns: list[str], wide: dict[str, str]) -> list[str]:
    """column_widths for `columns`: the `wide` ones fixed, the others sized to their content."""
    return [wide.get(c, "auto") for c in columns]


def rank_columns(data: AppData) -> list[str]:
    fused = ["LLM + prior rank"] if data.bundle.fusion is not None else []
    return ["LLM rank", "retriever rank", *fused, "letter", "title", "probability", "target"]


def _demo_line(data: AppData) -> str:
    ds = data.bundle.manifest.dataset
    return (f"Demo: **{ds.get('name', '?')}** ({ds.get('users', '?')} users, {ds.get('items', '?')} "
            "items)." + _precision_note(data))


def _precision_note(data: AppData) -> str:
    """Say when the served model is not the one the Overview's numbers evaluate."""
    if data.int8:
        return (" The ranker is served with **int8** weights (a quarter of the memory); the "
                "Overview's numbers are the float32 model's, which the app serves when started "
                "without int8.")
    if data.bf16:
        return " The ranker is served in **bfloat16** (the Overview's numbers are float32's)."
    return ""


def _user_picker(data: AppData, start, lo: int, hi: int) -> dict:
    """The user box (any reviewerID, '#id' or id; Enter), the list of matching users, Random
    and the filters. No list of every user goes to the page: the server searches."""
    label = logic.user_label(data, start) if start is not None else ""
    user = gr.Textbox(label, label="user (reviewerID, #id or id; Enter to load)", max_lines=1,
                      info="part of a reviewerID searches: the matches fill the list below",
                      elem_id="user")
    hits = gr.Dropdown([], value=None, label="matching users", interactive=True,
                       elem_id="user-hits")
    gr.Markdown(f"Opened on {logic.START_RULE}. " + logic.outcome_counts(data),
                elem_classes=["ulm-caption"], elem_id="start-rule")
    random_btn = gr.Button("Random user", elem_id="random")
    with gr.Accordion("Filters", open=False):
        min_len = gr.Slider(lo, hi, lo, step=1, label="history length ≥")
        max_len = gr.Slider(lo, hi, hi, step=1, label="history length ≤")
        retrieved = gr.Radio(logic.retrieved_choices(data), value="any",
                             label="next item among the 20 candidates", elem_id="retrieved")
        count = gr.Markdown(elem_id="user-count")
    return dict(user=user, hits=hits, random_btn=random_btn, filters=[min_len, max_len, retrieved],
                count=count)


def _ranking_section(data: AppData) -> dict:
    with gr.Accordion("Ranking: the LLM orders the 20 candidates", open=True):
        with gr.Row():
            rank_btn = gr.Button("Rank the 20 candidates", variant="primary",
                                 elem_id="rank-btn", scale=2)
            no_hist = gr.Checkbox(label="rank from the user index alone, no history "
                                  "(ULMRec-uid)", elem_id="no-history", scale=1)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                caption("history")
                history = gr.Markdown(label="history panel", show_label=False, elem_id="history")
            with gr.Column(scale=2, min_width=320):
                caption("chart")
                chart = gr.Plot(label="LLM probability per candidate", elem_id="chart",
                                show_label=False)
        caption("metrics")
        metrics = gr.Dataframe(label="this user's metrics", elem_id="metrics",
                               elem_classes=["ulm-table"],
                               column_widths=widths(ranking.METRIC_COLUMNS, {"system": "240px"}))
        with gr.Accordion("What the numbers mean", open=False, elem_id="glossary"):
            gr.Markdown(overview.GLOSSARY)
        caption("table")
        table = gr.Dataframe(label="candidates by LLM rank", wrap=True, elem_id="table",
                             elem_classes=["ulm-table"], max_height=FULL_HEIGHT,
                             column_widths=widths(rank_columns(data), {"title": "420px"}))
    return dict(rank_btn=rank_btn, no_hist=no_hist, history=history, chart=chart,
                metrics=metrics, table=table)


LADDER_COLUMNS = ["level", "prefix", "users sharing it", "generated preference",
                  "what these users share (data)"]


def _index_section() -> dict:
    with gr.Accordion("The user index: who shares this user's codes", open=True):
        caption("prefixes")
        prefixes = gr.Dataframe(headers=LADDER_COLUMNS[:3], label="users sharing each prefix",
                                elem_id="prefixes", elem_classes=["ulm-table"],
                                max_height=FULL_HEIGHT)
        caption("near")
        near_cols = ["user", "index", "shared levels", "extracted preference"]
        near = gr.Dataframe(headers=near_cols, label="nearest users by shared prefix", wrap=True,
                            elem_id="near", elem_classes=["ulm-table"], max_height=FULL_HEIGHT,
                            column_widths=widths(near_cols, {"user": "220px", "index": "200px",
                                                             "extracted preference": "520px"}))
    return dict(prefixes=prefixes, near=near)


def _decode_section() -> dict:
    with gr.Accordion("Decode the index level by level (paper §5.4.4)", open=True):
        pref = gr.Textbox(label="this user's extracted preference", lines=2,
                          interactive=False, elem_id="pref")
        ladder_btn = gr.Button("Decode <a>, <a><b>, … the full index", elem_id="ladder-btn")
        caption("ladder")
        ladder = gr.Dataframe(headers=LADDER_COLUMNS,
                              label="generated preference per prefix, beside what the "
                              "users sharing it have in common in the data", wrap=True,
                              elem_id="ladder", elem_classes=["ulm-table"], max_height=FULL_HEIGHT,
                              column_widths=widths(LADDER_COLUMNS, {
                                  "prefix": "190px", "generated preference": "320px",
                                  "what these users share (data)": "320px"}))
        caption("decoded")
        with gr.Row():
            prefix_box = gr.Textbox(label="any index prefix", placeholder="<a_12><b_3>",
                                    elem_id="prefix-box", scale=2, max_lines=2)
            decode_btn = gr.Button("Decode", elem_id="decode-btn", scale=0)
        decoded = gr.Textbox(label="generated preference", lines=2, interactive=False,
                             elem_id="decoded")
    return dict(pref=pref, ladder_btn=ladder_btn, ladder=ladder, prefix_box=prefix_box,
                decode_btn=decode_btn, decoded=decoded)


def _catalogue_tab() -> dict:
    with gr.Tab("Whole catalogue (LC-Rec)", elem_id="catalogue-tab"):
        gr.Markdown(
            "No retriever here: a second model, LC-Rec (Zheng et al., 2024), gives every "
            "item a code like the users' (`<a_*><b_*><c_*><d_*>`) and writes the codes of "
            "the items it recommends for the user picked on the first tab. Its search "
            "only follows codes of real items the user has not had, so every answer is "
            "a real, new item.")
        cat_btn = gr.Button(f"Recommend {catalogue.TOPN} items from the whole catalogue",
                            variant="primary", elem_id="catalogue-btn")
        cat_summary = gr.Markdown(label="summary", show_label=False, elem_id="catalogue-summary")
        caption("catalogue")
        cat_table = gr.Dataframe(headers=catalogue.COLUMNS, label="generated items, best first",
                                 wrap=True, elem_id="catalogue-table", visible=False,
                                 elem_classes=["ulm-table"], max_height=FULL_HEIGHT)
    return dict(cat_btn=cat_btn, cat_summary=cat_summary, cat_table=cat_table)


def _overview_tab(data: AppData) -> None:
    with gr.Tab("Overview"):
        table = overview.results_table(data.bundle.metrics, data.bundle.manifest.run)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                caption("dataset")
                gr.Markdown(overview.dataset_markdown(data), elem_id="dataset")
            with gr.Column(scale=2, min_width=320):
                gr.Markdown(overview.results_caption(data.bundle.metrics, table),
                            elem_classes=["ulm-caption"], elem_id="cap-results")
                gr.Dataframe(overview.results_styled(table), label="evaluation on test users",
                             elem_id="results", elem_classes=["ulm-table"],
                             max_height=FULL_HEIGHT)
        gr.Markdown(overview.GLOSSARY, elem_id="overview-glossary")
        caption("codebook")
        gr.Plot(overview.codebook_chart(data), label="codebook usage")
        caption("usage")
        gr.Dataframe(overview.codebook_usage(data), label="codebook usage per level",
                     elem_classes=["ulm-table"])
        gr.Markdown("### Notes\n" + overview.notes_markdown(data), elem_id="notes")
        with gr.Accordion("How to reproduce", open=False, elem_id="reproduce"):
            gr.Markdown(overview.reproduce_markdown(data))


def build_demo(data: AppData) -> gr.Blocks:
    m = data.bundle.manifest
    hist = data.users["history_len"]
    start = logic.start_user(data)
    backbone = str(m.backbone.get("id", "?")).rsplit("/", 1)[-1]
    retriever = {"lrurec": "LRURec", "sasrec": "SASRec"}.get(m.retriever, m.retriever or "?")
    with gr.Blocks(title=f"ULMRec · {m.name}") as demo:
        gr.Markdown("# ULMRec: an LLM recommender that knows its users\n"
                    + INTRO.format(retriever=retriever, backbone=backbone), elem_id="intro")
        gr.Markdown(_demo_line(data), elem_classes=["ulm-caption"])
        c = dict(status=gr.Textbox(label="status", elem_id="status", show_label=False,
                                   container=False),
                 shown=gr.State(start), loaded=gr.State(False))
        with gr.Tab("Explore a user"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    c |= _user_picker(data, start, int(hist.min()), int(hist.max()))
                with gr.Column(scale=3):
                    c["summary"] = gr.Markdown(elem_id="summary")
            c |= _ranking_section(data)
            c |= _index_section()
            c |= _decode_section()
        own = newuser.build_tab(data) if data.bundle.has_retriever else None
        if data.bundle.has_lcrec:
            c |= _catalogue_tab()
        _overview_tab(data)
        _wire(demo, data, c, start)
        if own is not None:
            newuser.wire(demo, data, own, c["status"], _warn)
    return demo


def _wire(demo: gr.Blocks, data: AppData, c: dict, start) -> None:
    """The events (after every tab is built: an event declared between two tabs would split
    the row of tabs)."""
    hidden = {"api_visibility": "private"}           # page plumbing, not an API
    # the decode and catalogue handlers share one slot ("model"): one generate at a time.
    # Ranking requests have their own group, wide enough that requests arriving together
    # reach ranking.RankBatcher together and share one forward pass.
    model = {"concurrency_id": "model"}
    rank_group = {"concurrency_id": "rank", "concurrency_limit": ranking.RANK_SLOTS}
    status, user, shown, filters = c["status"], c["user"], c["shown"], c["filters"]
    user_out = [status, c["summary"], c["prefixes"], c["near"], c["history"], c["pref"],
                c["prefix_box"], user, shown, c["loaded"], c["hits"]]
    rank_out = [status, c["chart"], c["table"], c["metrics"], c["history"]]
    look = [user, shown, *filters]

    def lookup(trigger, fn=on_user, inputs=look):
        """`trigger` loads the user it names, then ranks it if it is new. A mistake warns
        once: the next step finds the shown user's label back in the box."""
        return trigger(partial(fn, data), inputs, user_out, **hidden).then(
            partial(rank_if_loaded, data), [shown, c["no_hist"], c["loaded"]], rank_out,
            **rank_group, **hidden)

    lookup(user.submit)
    lookup(c["hits"].select, inputs=[c["hits"], shown, *filters])
    lookup(c["random_btn"].click, on_random, [*filters, shown])
    for f in filters:
        f.change(partial(on_filter, data), filters, [status, c["count"], c["hits"]], **hidden)
    # a button acts on what the box says: what was typed without Enter is looked up first
    c["rank_btn"].click(partial(on_user, data), look, user_out, **hidden).then(
        endpoints.rank_endpoint(data), [user, c["no_hist"]], rank_out, api_name="rank",
        **rank_group)
    c["no_hist"].change(partial(on_rank, data), [shown, c["no_hist"]], rank_out, **rank_group,
                        **hidden)
    lookup(c["ladder_btn"].click).then(endpoints.ladder_endpoint(data), user,
                                       [status, c["ladder"]], api_name="ladder", **model)
    decode = endpoints.decode_endpoint(data)
    decoded = [status, c["decoded"]]
    c["decode_btn"].click(decode, c["prefix_box"], decoded, api_name="decode", **model)
    c["prefix_box"].submit(decode, c["prefix_box"], decoded, **model, **hidden)
    if "cat_btn" in c:
        # the table appears with its first answer (empty, it would show a '1 2 3' header)
        lookup(c["cat_btn"].click).then(
            endpoints.catalogue_endpoint(data), user,
            [status, c["cat_summary"], c["cat_table"]], api_name="catalogue", **model) \
            .success(lambda: gr.update(visible=True), None, c["cat_table"], **hidden)
    demo.load(partial(on_filter, data), filters, [status, c["count"], c["hits"]], **hidden)
    if start is not None:
        lookup(demo.load, inputs=[user])
