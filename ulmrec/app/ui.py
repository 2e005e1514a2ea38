"""The Gradio page: layout and the event handlers that glue it to ulmrec.app.logic.

Handlers take `data` first (bound with functools.partial) and return one value per output.
A visitor's mistake (AppError) becomes a warning toast plus a status line, the other
outputs left as they were (gr.skip()), so the page and the server keep going.
"""
from __future__ import annotations

import html
from functools import partial

import gradio as gr

from . import catalogue, logic, overview, ranking
from .logic import AppData, AppError

CSS = """
.ulm-chips {display:flex; gap:.5rem; flex-wrap:wrap; margin:.25rem 0}
.ulm-chip {font-family:monospace; font-size:1.1rem; padding:.3rem .7rem; border-radius:1rem;
           color:#fff; display:inline-flex; gap:.4rem; align-items:baseline}
.ulm-chip small {opacity:.8; font-size:.75rem; text-transform:uppercase}
.ulm-l0 {background:#4c78a8} .ulm-l1 {background:#72b7b2} .ulm-l2 {background:#f58518}
.ulm-l3 {background:#e45756}
"""


def _warn(message: str, n_outputs: int):
    """A warning toast and the status line; every other output unchanged. Escaped: the
    message may quote what the visitor typed, e.g. '<b_1>', which would render as HTML."""
    message = html.escape(message, quote=False)
    gr.Warning(message)
    return (f"⚠️ {message}",) + tuple(gr.skip() for _ in range(n_outputs - 1))


def on_filter(data: AppData, min_len, max_len, retrieved):
    """New dropdown choices (the current user stays shown: Random draws from the new ones)."""
    try:
        choices = logic.user_choices(data, min_len, max_len, retrieved)
    except AppError as e:
        return _warn(str(e), 4)
    return "", f"{len(choices)} users match", gr.update(choices=choices), choices


def on_random(data: AppData, choices):
    try:
        return "", logic.random_user(choices)
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


def on_rank(data: AppData, value, no_history):
    """Chart, rank table, this user's metrics."""
    try:
        user = logic.resolve_user(data, value)
        _, fig, table, metrics = ranking.rank_view(data, user, bool(no_history))
        return "", fig, table, metrics
    except AppError as e:
        return _warn(str(e), 4)


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


def build_demo(data: AppData) -> gr.Blocks:
    m = data.bundle.manifest
    hist = data.users["history_len"]
    lo, hi = int(hist.min()), int(hist.max())
    choices = logic.user_choices(data)
    with gr.Blocks(title="ULMRec") as demo:
        gr.Markdown(
            f"# ULMRec · {m['dataset']['name']}\n"
            f"A user-centric LLM recommender: the **{m.get('retriever', '?')}** retriever proposes "
            f"20 items, the **{m.get('backbone', {}).get('id', '?')}** LLM (LoRA) ranks them by "
            f"a letter verbalizer, each user being a semantic index "
            f"(`{m.get('index_kind', '?')}`) learned from their reviews.")
        status = gr.Markdown(elem_id="status")
        state_choices = gr.State(choices)
        with gr.Tab("Explore a user"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    user = gr.Dropdown(choices, value=choices[0][1] if choices else None,
                                       label="User (reviewerID · #dense id), type to search",
                                       filterable=True, allow_custom_value=True, elem_id="user")
                    random_btn = gr.Button("🎲 Random user", elem_id="random")
                    with gr.Accordion("Filters", open=False):
                        min_len = gr.Slider(lo, hi, lo, step=1, label="history length ≥")
                        max_len = gr.Slider(lo, hi, hi, step=1, label="history length ≤")
                        retrieved = gr.Radio(list(logic.RETRIEVED), value="any",
                                             label="target retrieved")
                        count = gr.Markdown(f"{len(choices)} users match")
                with gr.Column(scale=3):
                    summary = gr.Markdown(elem_id="summary")
            with gr.Accordion("Semantic index", open=True):
                prefixes = gr.Dataframe(headers=["level", "prefix", "users sharing it"],
                                        label="users sharing each prefix", elem_id="prefixes")
                near = gr.Dataframe(headers=["user", "index", "shared levels", "extracted preference"],
                                    label="nearest users by shared prefix (their preferences "
                                    "beside this user's)", wrap=True, elem_id="near",
                                    column_widths=["22%", "20%", "8%", "50%"])
            with gr.Accordion("Decode level by level (paper §5.4.4)", open=True):
                pref = gr.Textbox(label="this user's extracted preference", lines=2,
                                  interactive=False, elem_id="pref")
                ladder_btn = gr.Button("Decode <a>, <a><b>, … the full index", elem_id="ladder-btn")
                ladder = gr.Dataframe(headers=["level", "prefix", "users sharing it",
                                               "generated preference"],
                                      label="generated preference per prefix", wrap=True,
                                      elem_id="ladder", column_widths=["8%", "22%", "10%", "60%"])
                with gr.Row():
                    prefix_box = gr.Textbox(label="any index prefix", placeholder="<a_12><b_3>",
                                            elem_id="prefix-box", scale=2)
                    decode_btn = gr.Button("Decode", elem_id="decode-btn", scale=0)
                decoded = gr.Textbox(label="generated preference", lines=2, interactive=False,
                                     elem_id="decoded")
            with gr.Accordion("Ranking", open=True):
                with gr.Row():
                    no_hist = gr.Checkbox(label="rank without history (ULMRec-uid)",
                                          elem_id="no-history")
                    rank_btn = gr.Button("Rank the 20 candidates", variant="primary",
                                         elem_id="rank-btn")
                with gr.Row():
                    with gr.Column(scale=1):
                        history = gr.Markdown(label="history", elem_id="history")
                    with gr.Column(scale=2):
                        chart = gr.Plot(label="verbalizer probability", elem_id="chart")
                metrics = gr.Dataframe(label="this user's metrics", elem_id="metrics")
                table = gr.Dataframe(label="candidates by LLM rank", wrap=True, elem_id="table")
        if data.bundle.has_lcrec:
            with gr.Tab("Whole catalogue (LC-Rec)", elem_id="catalogue-tab"):
                gr.Markdown(
                    "No retriever: an LC-Rec adapter (Zheng et al., 2024) writes item indices "
                    "`<a_*><b_*><c_*><d_*>` for the user picked on the first tab, by beam search "
                    "over a prefix trie of the catalogue's indices, so every answer is a real "
                    "item the user has not had. Log-probability = the model's, of writing "
                    "that index.")
                cat_btn = gr.Button(f"Recommend {catalogue.TOPN} items from the whole catalogue",
                                    variant="primary", elem_id="catalogue-btn")
                cat_summary = gr.Markdown(elem_id="catalogue-summary")
                cat_table = gr.Dataframe(label="generated items, best first", wrap=True,
                                         elem_id="catalogue-table")
        with gr.Tab("Overview"):
            with gr.Row():
                gr.Markdown(overview.dataset_markdown(data))
                with gr.Column(scale=2):
                    gr.Dataframe(overview.results_table(data.bundle.metrics), label="evaluation",
                                 elem_id="results")
                    gr.Markdown(overview.results_caption(data.bundle.metrics))
            gr.Plot(overview.codebook_chart(data), label="codebook usage")
            gr.Dataframe(overview.codebook_usage(data), label="codebook usage per level")
            gr.Markdown("### Notes\n" + overview.notes_markdown(data))

        filters = [min_len, max_len, retrieved]
        for f in filters:
            f.change(partial(on_filter, data), filters, [status, count, user, state_choices])
        random_btn.click(partial(on_random, data), state_choices, [status, user])
        # every handler that runs the model shares one queue slot pool ("model"): the
        # concurrency limit then bounds model calls across the page, not per button
        model = {"concurrency_id": "model"}
        rank_in, rank_out = [user, no_hist], [status, chart, table, metrics]
        user_out = [status, summary, prefixes, near, history, pref, prefix_box]
        user.change(partial(on_user, data), user, user_out) \
            .then(partial(on_rank, data), rank_in, rank_out, **model)
        rank_btn.click(partial(on_rank, data), rank_in, rank_out, api_name="rank", **model)
        no_hist.change(partial(on_rank, data), rank_in, rank_out, **model)
        ladder_btn.click(partial(on_ladder, data), user, [status, ladder], api_name="ladder", **model)
        decode_btn.click(partial(on_decode, data), prefix_box, [status, decoded], api_name="decode",
                         **model)
        prefix_box.submit(partial(on_decode, data), prefix_box, [status, decoded], **model)
        if data.bundle.has_lcrec:
            cat_btn.click(partial(on_catalogue, data), user, [status, cat_summary, cat_table],
                          api_name="catalogue", **model)
        demo.load(partial(on_user, data), user, user_out) \
            .then(partial(on_rank, data), rank_in, rank_out, **model)
    return demo
