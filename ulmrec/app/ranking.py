"""Ranking one user's 20 candidates: the verbalizer chart, the rank table and the user's metrics.

Concurrent ranking requests share one forward pass: `RankBatcher` hands whatever requests
are waiting when the model becomes free to `bundle.rank` as one batch (a lone request runs at
once, alone, so its latency is unchanged)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..metrics import metrics_from_ranks, target_ranks
from .logic import AppData, AppError, warm

BAR, TARGET = "#4c78a8", "#e4572e"
KS = (5, 10)
METRIC_COLUMNS = ["system", "target rank"] + [f"{name}@{k}" for k in KS
                                               for name in ("MRR", "NDCG", "Recall")]
# On CPU a 400-token prompt already keeps the cores busy at batch 1: a batch of 20 costs
# ~1.4x less than 20 single passes, not 20x less, so batches stay small and the first
# answers of a burst come back early; the queue lets this many requests wait for a batch.
MAX_BATCH = 5
GPU_BATCH = 20         # on a GPU a batch of 20 costs about one forward pass
RANK_SLOTS = 32
CACHE = 512            # (user, with/without history) rankings kept: the model is deterministic
ULMREC, ULMREC_UID, RETRIEVER = "ULMRec", "ULMRec, index only (no history)", "retriever (its own order)"
FUSED = "ULMRec + retriever prior"     # the LLM's log-probability + λ × the retriever's, λ from validation


class RankBatcher:
    """One forward pass for the ranking requests that wait together.

    The first caller to find the model idle becomes the leader: it takes the waiting
    requests (with and without history apart), orders them by prompt length, runs them in
    batches of up to `max_batch` of similar length (less padding), hands each caller its
    frame as its batch ends, and repeats until nothing waits. Followers just wait for their
    result. No timer: a request that finds the model idle never waits for company.
    A user ranked before is answered from a small cache (every visitor's first screen ranks
    the same start user)."""

    def __init__(self, bundle, max_batch: int = MAX_BATCH, cache: int = CACHE):
        self.bundle, self.max_batch, self.cache_size = bundle, max_batch, cache
        self._lock = threading.Lock()
        self._pending: list[tuple[int, bool, Future]] = []
        self._running = False
        self._cache: OrderedDict[tuple[int, bool], pd.DataFrame] = OrderedDict()
        self.batches: list[int] = []            # sizes of the batches run (bench, tests)

    def rank(self, user: int, no_history: bool = False) -> pd.DataFrame:
        fut: Future = Future()
        with self._lock:
            hit = self._cache.get((user, no_history))
            if hit is not None:
                self._cache.move_to_end((user, no_history))
                return hit.copy()
            self._pending.append((user, no_history, fut))
            lead = not self._running
            self._running = self._running or lead
        if lead:
            self._lead()
        return fut.result()

    def _lead(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                flag = self._pending[0][1]
                taken = [r for r in self._pending if r[1] == flag]
                self._pending = [r for r in self._pending if r[1] != flag]
            try:
                taken, built = self._by_length(taken, flag)
            except BaseException as e:
                self._fail(taken, e)
                continue
            for start in range(0, len(taken), self.max_batch):
                self._run(taken[start:start + self.max_batch], flag, built)

    def _by_length(self, taken: list, flag: bool) -> tuple[list, dict]:
        """The requests sorted by prompt length, and the prompts built to measure them
        (user → example), which the batches then rank instead of building them again."""
        lengths = getattr(self.bundle, "prompt_lengths", None)
        if len(taken) <= self.max_batch or lengths is None:
            return taken, {}
        users = [u for u, _, _ in taken]
        if hasattr(self.bundle, "examples"):
            examples, _ = self.bundle.examples(users, no_history=flag)
            n = lengths(users, no_history=flag, examples=examples)
            built = dict(zip(users, examples))
        else:
            n, built = lengths(users, no_history=flag), {}
        return [r for _, r in sorted(zip(n, taken), key=lambda x: x[0])], built

    @staticmethod
    def _fail(take: list, e: BaseException) -> None:
        for _, _, fut in take:                  # every waiting caller sees the failure
            fut.set_exception(e)

    def _run(self, take: list, flag: bool, built: dict | None = None) -> None:
        users = [u for u, _, _ in take]
        ready = built and all(u in built for u in users)
        extra = {"examples": [built[u] for u in users]} if ready else {}
        try:
            frames = self.bundle.rank(users, no_history=flag, batch_size=len(users), **extra)
        except BaseException as e:
            self._fail(take, e)
            return
        self.batches.append(len(users))
        with self._lock:
            for u, frame in zip(users, frames):
                self._cache[(u, flag)] = frame
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        for (_, _, fut), frame in zip(take, frames):
            fut.set_result(frame.copy())


def batcher(data: AppData) -> RankBatcher:
    """The AppData's batcher, made on first use (after warm(): the model's device is known)."""
    model = data.bundle.model()[0]
    with data.lock:
        if data.rank_batcher is None:
            gpu = next(model.parameters()).device.type != "cpu"
            data.rank_batcher = RankBatcher(data.bundle, GPU_BATCH if gpu else MAX_BATCH)
        return data.rank_batcher


def rank_user(data: AppData, user: int, no_history: bool = False) -> pd.DataFrame:
    """letter, item, title, score, prob, retriever_rank, llm_rank, is_target (bundle.rank;
    batched with whatever other ranking requests wait at the same time)."""
    if user not in data.test_candidates:
        raise AppError(f"user {user} has no test candidates in this bundle")
    warm(data)
    return batcher(data).rank(user, bool(no_history))


def short(title: str, n: int = 30) -> str:
    return title if len(title) <= n else title[: n - 1].rstrip() + "…"


# A tick label is the letter and the title's start, on one line: on a 390 px phone the labels
# and the bars share ~350 px, and two lines of 34 characters left the bars no room and were
# cut; the full title is in the bar's hover text.
TICK_CHARS = 18


def tick_labels(frame: pd.DataFrame) -> list[str]:
    """'A · title…' per candidate: the letter the LLM answers with, first. Padded to one
    width with no-break spaces (SVG collapses plain ones), so that the right-aligned monospace
    labels start in one column: the letters line up."""
    return [f"{letter} · {short(str(t), TICK_CHARS)}".ljust(TICK_CHARS + 4, "\u00a0")
            for letter, t in zip(frame["letter"], frame["title"])]


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
            customdata=frame.loc[part, ["llm_rank", "retriever_rank", "letter", "title"]].to_numpy(),
            hovertemplate="%{customdata[2]} · %{customdata[3]}<br>p = %{x:.4f}<br>LLM rank "
                          "%{customdata[0]}, retriever rank %{customdata[1]}<extra></extra>"))
    # title on the first line, legend on the second, left-aligned: side by side they ran into
    # each other on a phone, and below the plot the legend ran into the axis title. Few x
    # ticks, in percent: the default ones collided at 390 px.
    fig.update_layout(
        title={"text": title, "x": 0, "xanchor": "left", "y": 0.995, "yanchor": "top",
               "font": {"size": 14}, "pad": {"l": 6}},
        height=720, margin={"l": 8, "r": 12, "t": 72, "b": 48}, bargap=0.25,
        legend={"orientation": "h", "x": 0, "xanchor": "left", "y": 1.0, "yanchor": "bottom"},
        xaxis={"title": {"text": "LLM probability"}, "tickformat": "~%", "nticks": 4,
               "automargin": True},
        yaxis={"categoryorder": "array", "categoryarray": labels, "autorange": "reversed",
               "tickfont": {"family": "monospace", "size": 11}, "automargin": True})
    return fig


def rank_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Candidates by LLM rank, the retriever's rank beside it."""
    t = frame.sort_values("llm_rank")
    out = pd.DataFrame({"LLM rank": t["llm_rank"], "retriever rank": t["retriever_rank"]})
    if "fused_rank" in t:
        out["LLM + prior rank"] = t["fused_rank"]
    return out.assign(letter=t["letter"], title=t["title"],
                      probability=t["prob"].astype(float).round(4),
                      target=np.where(t["is_target"], "✓", ""))


def user_metrics(frame: pd.DataFrame, no_history: bool = False) -> pd.DataFrame:
    """This user's Recall/MRR/NDCG@5,10 from the target's pessimistic LLM rank, and from the
    retriever's order; a target outside the candidates scores 0 (the Overall view)."""
    hit = np.flatnonzero(frame["is_target"].to_numpy())
    pos = int(hit[0]) if len(hit) else -1
    llm = target_ranks(frame["prob"].to_numpy()[None, :], [pos])
    retr = np.array([pos + 1.0 if pos >= 0 else np.inf])
    systems = [(ULMREC_UID if no_history else ULMREC, llm), (RETRIEVER, retr)]
    if "fused_score" in frame and not no_history:     # λ was fitted with the history shown
        systems.insert(1, (FUSED, target_ranks(frame["fused_score"].to_numpy()[None, :], [pos])))
    rows = []
    for system, ranks in systems:
        m = metrics_from_ranks(ranks, KS)
        rows.append({"system": system, "target rank": "—" if np.isinf(ranks[0]) else int(ranks[0]),
                     **{f"{name}@{k}": round(m[f"{name}@{k}"], 4)
                        for k in KS for name in ("MRR", "NDCG", "Recall")}})
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def mark_best(table: pd.DataFrame, columns: list[str], lower: tuple[str, ...] = ()):
    """A pandas Styler: per column, the best value in bold on a green ground (the lowest for
    the `lower` columns, the highest otherwise); nothing marked where all rows tie."""
    def best(col: pd.Series):
        vals = pd.to_numeric(col, errors="coerce")
        if vals.nunique(dropna=True) < 2:
            return [""] * len(col)
        top = vals.min() if col.name in lower else vals.max()
        return ["font-weight: bold; background-color: #d9f2d9" if v == top else "" for v in vals]
    cols = [c for c in columns if c in table]
    return table.style.apply(best, subset=cols).format(precision=4, subset=cols)


def metrics_styled(metrics: pd.DataFrame):
    cols = [c for c in metrics.columns if "@" in c] + ["target rank"]
    return mark_best(metrics, cols, lower=("target rank",))


def rank_view(data: AppData, user: int, no_history: bool = False):
    """(frame, chart, table, metrics) for one user."""
    frame = rank_user(data, user, no_history)
    mode = "index only, no history" if no_history else "index + history"
    missed = "" if frame["is_target"].any() else " · target not retrieved"
    return (frame, prob_chart(frame, f"user #{user} ({mode}){missed}"), rank_table(frame),
            user_metrics(frame, no_history))
