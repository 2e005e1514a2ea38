"""The page's event handlers: ulmrec.app.logic's answers as one value per output component.

Each takes `data` first and returns one value per output. A visitor's mistake (AppError)
becomes one warning toast plus the status line (the text API clients read), the other
outputs left as they were (gr.skip()), so the page and the server keep going.

Which user the page shows lives in the session (the `shown` state), not in the box: the box
is where a visitor types, so after a mistake it shows the shown user's label again.
"""
from __future__ import annotations

import html

import gradio as gr

from . import catalogue, logic, ranking
from .logic import AppData, AppError

USER_VIEW = 6          # summary, prefix counts, nearest users, history, preference, decode box
USER_OUTPUTS = 1 + USER_VIEW + 4   # status first; then the box, shown, loaded, matching users
RANK_OUTPUTS = 5       # status, chart, table, metrics, history


def _warn(message: str, n_outputs: int):
    """A warning toast on the page and the message as the (hidden) status output, which API
    clients read as plain text; every other output unchanged. The toast renders HTML, so its
    copy is escaped: the message may quote what the visitor typed, e.g. '<b_1>'."""
    gr.Warning(html.escape(message, quote=False))
    return (f"⚠️ {message}",) + tuple(gr.skip() for _ in range(n_outputs - 1))


def _skips(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))


# ------------------------------------------------------------------ picking a user

def _user_view(data: AppData, user: int) -> tuple:
    """Summary with the index chips, prefix counts, nearest users, history, preference, and
    the user's first code for the decode box."""
    chips = logic.index_chips(data, user)
    if data.levels:
        prefixes, near = logic.prefix_table(data, user), logic.nearest_users(data, user)
        first = prefixes["prefix"].iloc[0]
    else:
        prefixes = near = None
        first = ""
    return (logic.user_summary(data, user) + "\n\n" + chips, prefixes, near,
            logic.history_markdown(data, user), logic.user_preference(data, user), first)


def _show(data: AppData, user: int) -> tuple:
    """Every output for a newly shown user (`loaded`: the next step ranks it)."""
    return ("",) + _user_view(data, user) + (logic.user_label(data, user), user, True, gr.skip())


def _keep(data: AppData, shown, status: str = "", hits=None) -> tuple:
    """The shown user stays: its label back in the box, nothing else redrawn or re-ranked."""
    label = logic.user_label(data, shown) if shown is not None else ""
    return ((status,) + _skips(USER_VIEW)
            + (label, gr.skip(), False, gr.skip() if hits is None else hits))


def _refuse(data: AppData, shown, e: AppError) -> tuple:
    status = _warn(str(e), 1)[0]
    return _keep(data, shown, status)


def _searchable(value) -> str | None:
    """The text to search reviewerIDs for, or None where it names an id or nothing: an id
    that does not exist is a mistake to report, not a search."""
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > logic.ECHO or " · #" in text or text.lstrip("#").isdigit():
        return None
    return text


def n_match(n: int) -> str:
    return f"{n} user matches" if n == 1 else f"{n} users match"


def _matches_update(data: AppData, n: int, ids: list[int], what: str):
    more = f", the first {len(ids)} here" if n > len(ids) else ""
    return gr.update(choices=logic.user_labels(data, ids), value=None,
                     label=f"{n_match(n)} {what}{more}: pick one")


def on_user(data: AppData, value, shown=None, min_len=None, max_len=None, retrieved="any"):
    """Load the user the box names (Enter, a button, a picked match): USER_OUTPUTS values.

    A reviewerID, '#id', id or label loads that user; other text searches the reviewerIDs of
    the filtered users: one match loads it, several fill the list under the box. A mistake
    (an empty box, an unknown user) warns once and keeps the user shown."""
    try:
        user = logic.resolve_user(data, value)
    except AppError as e:
        query = _searchable(value)
        n, ids = logic.search_users(data, query, min_len, max_len, retrieved) if query else (0, [])
        if n == 0:
            return _refuse(data, shown, e)
        if n > 1:
            gr.Info(html.escape(f"{n_match(n)} {logic.echo(query)}: pick one in the list "
                                "under the box", quote=False))
            return _keep(data, shown, hits=_matches_update(data, n, ids, logic.echo(query)))
        user = ids[0]
    if user == shown:
        return _keep(data, shown)
    try:
        return _show(data, user)
    except AppError as e:
        return _refuse(data, shown, e)


def on_random(data: AppData, min_len, max_len, retrieved, shown=None):
    """A random user passing the filters, never the one shown: on_user's outputs."""
    try:
        return _show(data, logic.draw_user(data, min_len, max_len, retrieved, current=shown))
    except AppError as e:
        return _refuse(data, shown, e)


def on_filter(data: AppData, min_len, max_len, retrieved):
    """status, how many users match, the list of (at most SEARCH_HITS of) them."""
    try:
        n, ids = logic.search_users(data, "", min_len, max_len, retrieved)
    except AppError as e:
        return _warn(str(e), 3)
    return "", n_match(n), _matches_update(data, n, ids, "the filters")


# ------------------------------------------------------------------ the actions

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
        return _warn(str(e), RANK_OUTPUTS)


def rank_if_loaded(data: AppData, shown, no_history, loaded):
    """Rank the shown user after a lookup that loaded a new one; after a refused or
    unchanged one nothing (the chart already shows that user)."""
    if not loaded:
        return _skips(RANK_OUTPUTS)
    return on_rank(data, shown, no_history)


def on_ladder(data: AppData, value):
    try:
        user = logic.resolve_user(data, value)
        return "", logic.ladder(data, user)
    except AppError as e:
        return _warn(str(e), 2)


def on_decode(data: AppData, text):
    """status, the generated preference; a refused prefix clears the text of the last one,
    which would otherwise read as the answer to this one."""
    try:
        return "", logic.decode_prefix(data, text)
    except AppError as e:
        return _warn(str(e), 1) + ("",)


def on_catalogue(data: AppData, value):
    """LC-Rec's whole-catalogue top-10: summary, table."""
    try:
        user = logic.resolve_user(data, value)
        return ("",) + catalogue.catalogue_view(data, user)
    except AppError as e:
        return _warn(str(e), 3)
