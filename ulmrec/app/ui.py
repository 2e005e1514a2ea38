"""The Gradio page: layout and the event handlers that glue it to ulmrec.app.logic.

Handlers take `data` first (bound with functools.partial) and return one value per output.
A visitor's mistake (AppError) becomes a warning toast plus a status line, the other
outputs left as they were (gr.skip()), so the page and the server keep going.
"""
from __future__ import annotations

import html
from functools import partial

import gradio as gr

from . import catalogue, logic, newuser, overview, ranking
from .logic import AppData, AppError

CSS = """
.ulm-chips {display:flex; gap:.5rem; flex-wrap:wrap; margin:.25rem 0}
.ulm-chip {font-family:monospace; font-size:1.1rem; padding:.3rem .7rem; border-radius:1rem;
           color:#fff; display:inline-flex; gap:.4rem; align-items:baseline}
.ulm-chip small {opacity:.8; font-size:.75rem; text-transform:uppercase}
.ulm-l0 {background:#4c78a8} .ulm-l1 {background:#72b7b2} .ulm-l2 {background:#f58518}
.ulm-l3 {background:#e45756}
.ulm-caption, .ulm-caption p {font-size:.85rem; opacity:.8; margin:0}
#status {display:none}
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


def _warn(message: str, n_outputs: int):
    """A warning toast on the page and the message as the (hidden) status output, which API
    clients read as plain text; every other output unchanged. The toast renders HTML, so its
    copy is escaped: the message may quote what the visitor typed, e.g. '<b_1>'."""
    gr.Warning(html.escape(message, quote=False))
    return (f"⚠️ {message}",) + tuple(gr.skip() for _ in range(n_outputs - 1))


def _dropdown_choices(data: AppData, choices, current):
    """The filtered choices plus the user shown now, so the box keeps its label ('A1B2 · #7')
    instead of a bare id when that user falls outside the filters."""
    try:
        user = logic.resolve_user(data, current)
    except AppError:
        return choices
    if any(u == user for _, u in choices):
        return choices
    return [(logic.user_label(data, user), user)] + list(choices)


def on_filter(data: AppData, min_len, max_len, retrieved, current=None):
    """New dropdown choices (the current user stays shown: Random draws from the new ones)."""
    try:
        choices = logic.user_choices(data, min_len, max_len, retrieved)
    except AppError as e:
        return _warn(str(e), 4)
    return ("", f"{len(choices)} users match",
            gr.update(choices=_dropdown_choices(data, choices, current)), choices)


def on_random(data: AppData, choices, current=None):
    try:
        return "", logic.random_user(choices, current=current)
    except AppError as e:
        return _warn(str(e), 2)


USER_OUTPUTS = 7


def on_user(data: AppData, value):
    """Summary, index chips, prefix counts, nearest users, history, preference, decode box."""
    if value is None or value == "":
        return ("",) + tuple(gr.skip() for _ in range(USER_OUTPUTS - 1))
    try:
        user = logic.resolve_user(data, value)
        chips = logic.index_chips(data, user)
        if data.levels:
            prefixes, near = logic.prefix_table(data, user), logic.nearest_users(data, user)
            first = prefixes["prefix"].iloc[0]
        else:
            prefixes = near = None
            first = ""
        return ("", logic.user_summary(data, user) + "\n\n" + chips, prefixes, near,
                logic.history_markdown(data, user), logic.user_preference(data, user), first)
    except AppError as e:
        return _warn(str(e), USER_OUTPUTS)


def history_panel(data: AppData, user: int, no_history: bool) -> str:
    if not no_history:
        return logic.history_markdown(data, user)
    n = int(data.users.at[user, "history_len"])
    return ("**History not used.** In this mode the LLM ranks from the user index alone (the "
            f"paper's ULMRec-uid): the user's {n} past items are left out of its prompt.")


def on_rank(data: AppData, value, no_history):
    """Chart, rank table, this user's metrics (best marked), the history panel."""
    try:
        user = logic.resolve_user(data, value)
        _, fig, table, metrics = ranking.rank_view(data, user, bool(no_history))
        return ("", fig, table, ranking.metrics_styled(metrics),
                history_panel(data, user, bool(no_history)))
    except AppError as e:
        return _warn(str(e), 5)


def on_ladder(data: AppData, value):
    try:
        user = logic.resolve_user(data, value)
        return "", logic.ladder(data, user)
    except AppError as e:
        return _warn(str(e), 2)


def on_decode(data: AppData, text):
    try:
        return "", logic.decode_prefix(data, text)
    except AppError as e:
        return _warn(str(e), 2)


def on_catalogue(data: AppData, value):
    """LC-Rec's whole-catalogue top-10: summary, table."""
    try:
        user = logic.resolve_user(data, value)
        return ("",) + catalogue.catalogue_view(data, user)
    except AppError as e:
        return _warn(str(e), 3)


def _demo_line(data: AppData) -> str:
    m = data.bundle.manifest
    ds = m.get("dataset", {})
    return (f"Demo: **{ds.get('name', '?')}** ({ds.get('users', '?')} users, {ds.get('items', '?')} "
            "items). Serve another one with `python app.py --bundle <folder or Hub repo>` "
            "(`make demo DEMO=games` / `DEMO=gift-cards`)." + _precision_note(data))


def _precision_note(data: AppData) -> str:
    """Say when the served model is not the one the Overview's numbers evaluate."""
    if data.int8:
        return (" The ranker is served in **int8** for speed; the Overview's numbers are the "
                "float32 model's, which `python app.py` without `--int8` serves.")
    if data.bf16:
        return " The ranker is served in **bfloat16** (the Overview's numbers are float32's)."
    return ""


def build_demo(data: AppData) -> gr.Blocks:
    m = data.bundle.manifest
    hist = data.users["history_len"]
    lo, hi = int(hist.min()), int(hist.max())
    choices = logic.user_choices(data)
    start = logic.start_user(data)
    backbone = str(m.get("backbone", {}).get("id", "?")).rsplit("/", 1)[-1]
    retriever = {"lrurec": "LRURec", "sasrec": "SASRec"}.get(m.get("retriever"), m.get("retriever", "?"))
    hidden = {"api_visibility": "private"}           # page plumbing, not an API
    with gr.Blocks(title=f"ULMRec · {m['dataset']['name']}") as demo:
        gr.Markdown(f"# ULMRec: an LLM recommender that knows its users\n"
                    + INTRO.format(retriever=retriever, backbone=backbone), elem_id="intro")
        gr.Markdown(_demo_line(data), elem_classes=["ulm-caption"])
        status = gr.Textbox(elem_id="status", show_label=False, container=False)
        state_choices = gr.State(choices)
        with gr.Tab("Explore a user"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    user = gr.Dropdown(choices, value=start,
                                       label="User (reviewerID · #id), type to search",
                                       filterable=True, allow_custom_value=True, elem_id="user")
                    gr.Markdown(f"Opened on {logic.START_RULE}.", elem_classes=["ulm-caption"],
                                elem_id="start-rule")
                    random_btn = gr.Button("Random user", elem_id="random")
                    with gr.Accordion("Filters", open=False):
                        min_len = gr.Slider(lo, hi, lo, step=1, label="history length ≥")
                        max_len = gr.Slider(lo, hi, hi, step=1, label="history length ≤")
                        retrieved = gr.Radio(list(logic.RETRIEVED), value="any",
                                             label="next item among the 20 candidates")
                        count = gr.Markdown(f"{len(choices)} users match")
                with gr.Column(scale=3):
                    summary = gr.Markdown(elem_id="summary")
            with gr.Accordion("Ranking: the LLM orders the 20 candidates", open=True):
                with gr.Row():
                    rank_btn = gr.Button("Rank the 20 candidates", variant="primary",
                                         elem_id="rank-btn", scale=2)
                    no_hist = gr.Checkbox(label="rank from the user index alone, no history "
                                          "(ULMRec-uid)", elem_id="no-history", scale=1)
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        caption("history")
                        history = gr.Markdown(elem_id="history")
                    with gr.Column(scale=2, min_width=320):
                        caption("chart")
                        chart = gr.Plot(label="LLM probability per candidate", elem_id="chart",
                                        show_label=False)
                caption("metrics")
                metrics = gr.Dataframe(label="this user's metrics", elem_id="metrics",
                                       elem_classes=["ulm-table"])
                with gr.Accordion("What the numbers mean", open=False, elem_id="glossary"):
                    gr.Markdown(overview.GLOSSARY)
                caption("table")
                table = gr.Dataframe(label="candidates by LLM rank", wrap=True, elem_id="table",
                                     elem_classes=["ulm-table"])
            with gr.Accordion("The user index: who shares this user's codes", open=True):
                caption("prefixes")
                prefixes = gr.Dataframe(headers=["level", "prefix", "users sharing it"],
                                        label="users sharing each prefix", elem_id="prefixes",
                                        elem_classes=["ulm-table"])
                caption("near")
                near = gr.Dataframe(headers=["user", "index", "shared levels", "extracted preference"],
                                    label="nearest users by shared prefix", wrap=True,
                                    elem_id="near", elem_classes=["ulm-table"],
                                    column_widths=["200px", "190px", "80px", "480px"])
            with gr.Accordion("Decode the index level by level (paper §5.4.4)", open=True):
                pref = gr.Textbox(label="this user's extracted preference", lines=2,
                                  interactive=False, elem_id="pref")
                ladder_btn = gr.Button("Decode <a>, <a><b>, … the full index", elem_id="ladder-btn")
                caption("ladder")
                ladder = gr.Dataframe(headers=["level", "prefix", "users sharing it",
                                               "generated preference",
                                               "what these users share (data)"],
                                      label="generated preference per prefix, beside what the "
                                      "users sharing it have in common in the data", wrap=True,
                                      elem_id="ladder", elem_classes=["ulm-table"],
                                      column_widths=["6%", "16%", "8%", "35%", "35%"])
                caption("decoded")
                with gr.Row():
                    prefix_box = gr.Textbox(label="any index prefix", placeholder="<a_12><b_3>",
                                            elem_id="prefix-box", scale=2, max_lines=2)
                    decode_btn = gr.Button("Decode", elem_id="decode-btn", scale=0)
                decoded = gr.Textbox(label="generated preference", lines=2, interactive=False,
                                     elem_id="decoded")
        own = newuser.build_tab(data) if data.bundle.has_retriever else None
        if data.bundle.has_lcrec:
            with gr.Tab("Whole catalogue (LC-Rec)", elem_id="catalogue-tab"):
                gr.Markdown(
                    "No retriever here: a second model, LC-Rec (Zheng et al., 2024), gives every "
                    "item a code like the users' (`<a_*><b_*><c_*><d_*>`) and writes the codes of "
                    "the items it recommends for the user picked on the first tab. Its search "
                    "only follows codes of real items the user has not had, so every answer is "
                    "a real, new item.")
                cat_btn = gr.Button(f"Recommend {catalogue.TOPN} items from the whole catalogue",
                                    variant="primary", elem_id="catalogue-btn")
                cat_summary = gr.Markdown(elem_id="catalogue-summary")
                caption("catalogue")
                cat_table = gr.Dataframe(headers=catalogue.COLUMNS, label="generated items, best first",
                                         wrap=True, elem_id="catalogue-table", visible=False,
                                         elem_classes=["ulm-table"])
        with gr.Tab("Overview"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    caption("dataset")
                    gr.Markdown(overview.dataset_markdown(data), elem_id="dataset")
                with gr.Column(scale=2, min_width=320):
                    gr.Markdown(overview.results_caption(data.bundle.metrics),
                                elem_classes=["ulm-caption"], elem_id="cap-results")
                    gr.Dataframe(overview.results_styled(overview.results_table(
                        data.bundle.metrics, m.get("run"))), label="evaluation on test users",
                        elem_id="results", elem_classes=["ulm-table"])
            gr.Markdown(overview.GLOSSARY, elem_id="overview-glossary")
            caption("codebook")
            gr.Plot(overview.codebook_chart(data), label="codebook usage")
            caption("usage")
            gr.Dataframe(overview.codebook_usage(data), label="codebook usage per level",
                         elem_classes=["ulm-table"])
            gr.Markdown("### Notes\n" + overview.notes_markdown(data), elem_id="notes")

        filters = [min_len, max_len, retrieved]
        for f in filters:
            f.change(partial(on_filter, data), filters + [user], [status, count, user, state_choices],
                     **hidden)
        random_btn.click(partial(on_random, data), [state_choices, user], [status, user], **hidden)
        # the decode and catalogue handlers share one slot ("model"): one generate at a time.
        # Ranking requests have their own group, wide enough that requests arriving together
        # reach ranking.RankBatcher together and share one forward pass.
        model = {"concurrency_id": "model"}
        rank_group = {"concurrency_id": "rank", "concurrency_limit": ranking.RANK_SLOTS}
        rank_in, rank_out = [user, no_hist], [status, chart, table, metrics, history]
        user_out = [status, summary, prefixes, near, history, pref, prefix_box]
        user.change(partial(on_user, data), user, user_out, **hidden) \
            .then(partial(on_rank, data), rank_in, rank_out, **rank_group, **hidden)
        rank_btn.click(partial(on_rank, data), rank_in, rank_out, api_name="rank", **rank_group)
        no_hist.change(partial(on_rank, data), rank_in, rank_out, **rank_group, **hidden)
        ladder_btn.click(partial(on_ladder, data), user, [status, ladder], api_name="ladder", **model)
        decode_btn.click(partial(on_decode, data), prefix_box, [status, decoded], api_name="decode",
                         **model)
        prefix_box.submit(partial(on_decode, data), prefix_box, [status, decoded], **model, **hidden)
        if data.bundle.has_lcrec:
            # the table appears with its first answer (empty, it would show a '1 2 3' header)
            cat_btn.click(partial(on_catalogue, data), user, [status, cat_summary, cat_table],
                          api_name="catalogue", **model) \
                .success(lambda: gr.update(visible=True), None, cat_table, **hidden)
        if own is not None:
            newuser.wire(data, own, status, _warn)
        demo.load(partial(on_user, data), user, user_out, **hidden) \
            .then(partial(on_rank, data), rank_in, rank_out, **rank_group, **hidden)
    return demo
