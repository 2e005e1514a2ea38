"""The Gradio app's callbacks on a tiny real bundle (random Llama, P-ID index, gift-cards),
and a bounded load test against the served app on loopback."""
import itertools
import json
import random
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ARGS = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random", "--index-kind", "pid",
        "--preference-source", "extractive", "--max-history", "3", "--max-title-words", "4",
        "--max-len", "256"]


def _write_pid_table(ds, runs: Path) -> None:
    """A hand-made P-ID table in place of `train.index` (which needs the sentence encoder):
    few codes on the upper levels so that users share prefixes, unique full indices."""
    from ulmrec.indexing.table import build_table
    rng = np.random.default_rng(0)
    n = ds.num_users
    abc = np.stack([rng.integers(0, 3, n), rng.integers(0, 4, n), rng.integers(0, 6, n)], axis=1)
    d = np.zeros(n, dtype=int)
    seen: dict[tuple, int] = {}
    for i, row in enumerate(map(tuple, abc)):       # d numbers the users of each (a, b, c) group
        d[i] = seen.get(row, 0)
        seen[row] = d[i] + 1
    table = build_table(ds.users, "pid", np.column_stack([abc, d]))
    out = runs / ds.name / "index"
    out.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out / "user_index.parquet")


def _tiny_lcrec() -> None:
    """A 3-step LC-Rec run (real item index, tiny random Llama) for the whole-catalogue tab."""
    from train import lcrec
    assert lcrec.main(["--dataset", "gift-cards", "--tiny-backbone", "--index-epochs", "5",
                       "--max-steps", "3", "--batch-size", "2", "--eval-users", "4", "--beams", "6",
                       "--topn", "5", "--prompt-format", "alpaca", "--max-history", "5",
                       "--preference-source", "none"]) == 0


def build_tiny_bundle(root: Path) -> Path:
    """root/bundle: a 2-step run exported the way the real demo bundle is (with its data).
    Built once per session and shared by test_app and test_app_browser."""
    bundle = root / "bundle"
    if (bundle / "bundle.json").exists():
        return bundle
    from tiny_run import train_and_evaluate

    from train import export
    from ulmrec.data import load_dataset
    mp = pytest.MonkeyPatch()
    mp.setenv("ULMREC_RUNS", str(root / "runs"))
    try:
        _write_pid_table(load_dataset("gift-cards"), root / "runs")
        train_and_evaluate(ARGS, root / "results")
        _tiny_lcrec()
        assert export.main(["--dataset", "gift-cards", "--run-name", "t", "--results-dir",
                            str(root / "results"), "--out", str(bundle),
                            "--lcrec", str(root / "runs" / "gift-cards" / "lcrec")]) == 0
    finally:
        mp.undo()
    return bundle


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ulmrec.app.logic import prepare, warm
    from ulmrec.bundle import load_bundle
    d = prepare(load_bundle(build_tiny_bundle(tmp_path_factory.getbasetemp())))
    warm(d)
    return d


def _with_missed_target(data, user):
    """A copy of `data` where `user`'s test target was not retrieved (random retrieval always
    retrieves it): the target replaced by an item the user has not seen."""
    from ulmrec.app.logic import prepare
    b = data.bundle
    cands = b.candidates.copy()
    row = cands.index[(cands["user"] == user) & (cands["split"] == "test")][0]
    target = int(b.users.set_index("user").at[user, "target"])
    c = [int(i) for i in cands.at[row, "candidates"]]
    other = next(int(i) for i in b.items["item"] if int(i) not in c)
    cands.at[row, "candidates"] = [other if i == target else i for i in c]
    import dataclasses
    return prepare(dataclasses.replace(b, candidates=cands, _model=b._model, _tok=b._tok))


# ------------------------------------------------------------------ picking a user

def test_choices_filters_and_random(data):
    from ulmrec.app.logic import AppError, random_user, user_choices
    users = data.bundle.users
    every = user_choices(data)
    assert len(every) == data.bundle.candidates.query("split == 'test'")["user"].nunique() == 453
    label, uid = every[0]
    assert label == f"{users.set_index('user').at[uid, 'reviewerID']} · #{uid}"
    short = user_choices(data, 5, 6)
    lens = users.set_index("user")["history"].map(len)
    assert {u for _, u in short} == set(lens[(lens >= 5) & (lens <= 6)].index)
    assert user_choices(data, retrieved="no") == []          # random retrieval holds every target
    missed = _with_missed_target(data, uid)
    assert user_choices(missed, retrieved="no") == [(label, uid)]
    assert uid not in {u for _, u in user_choices(missed, retrieved="yes")}
    assert random_user(short, random.Random(0)) in {u for _, u in short}
    from ulmrec.app import logic, ui
    # the page gets the count and at most SEARCH_HITS labels, never the whole list
    status, count, hits = ui.on_filter(data, 5, 6, "any")
    assert status == "" and count == f"{len(short)} users match"
    assert hits["choices"] == [lb for lb, _ in short][: logic.SEARCH_HITS]
    status, count, hits = ui.on_filter(data, None, None, "any")
    assert count == "453 users match" and len(hits["choices"]) == logic.SEARCH_HITS == 50
    assert "the first 50" in hits["label"]
    # Random draws on the server from the filter values
    rng = random.Random(0)
    assert {logic.draw_user(data, 5, 6, rng=rng) for _ in range(20)} <= {u for _, u in short}
    with pytest.raises(AppError, match="no user matches"):
        random_user(user_choices(data, 1000, None))
    with pytest.raises(AppError, match="no user matches"):
        logic.draw_user(data, 1000, None)


def test_outcome_counts_and_a_filter_for_each_group(data):
    """The bundle's evaluated users, grouped by where the LLM put the real item against the
    retriever (up / same / down): counted on the page and browsable through the filter."""
    from ulmrec.app import logic, ui
    out = data.bundle.outcomes
    assert out is not None and len(out) == data.bundle.manifest.outcomes["users"] > 0
    n = out["moved"].value_counts()
    text = logic.outcome_counts(data)
    assert f"{len(out):,} evaluated test users" in text
    for move, words in (("up", "moved it **up** for"), ("same", "**in place** for"),
                        ("down", "moved it **down** for")):
        assert f"{words} {n.get(move, 0):,}" in text
        ids = set(logic.filtered_users(data, retrieved=move))
        assert ids == set(out.index[out["moved"] == move])
        status, count, _ = ui.on_filter(data, None, None, move)
        assert status == "" and count == f"{len(ids)} users match"
    assert [v for _, v in logic.retrieved_choices(data)] == ["any", "yes", "no", "up", "same", "down"]
    status, *_ = ui.on_filter(data, None, None, "sideways")
    assert status.startswith("⚠️") and "sideways" in status


def test_resolve_user_by_id_label_or_reviewer_and_unknown(data):
    from ulmrec.app import ui
    from ulmrec.app.logic import AppError, resolve_user
    row = data.bundle.users.iloc[16]
    uid, rid = int(row["user"]), row["reviewerID"]
    for value in (uid, str(uid), f"#{uid}", rid, f"{rid} · #{uid}"):
        assert resolve_user(data, value) == uid
    with pytest.raises(AppError, match="unknown user 'NOT-A-USER'"):
        resolve_user(data, "NOT-A-USER")
    with pytest.raises(AppError, match="unknown user id 9999 .ids run 1..453"):
        resolve_user(data, 9999)
    # on the page: a status line, the other outputs untouched, nothing raised
    out = ui.on_user(data, "NOT-A-USER")
    assert out[0] == "⚠️ unknown user 'NOT-A-USER'" and len(out) == ui.USER_OUTPUTS
    out = ui.on_user(data, uid)
    assert out[0] == "" and rid in out[1] and "&lt;a_" in out[1]


def _out(out) -> dict:
    """ui.on_user's outputs by name."""
    names = ["status", "summary", "prefixes", "near", "history", "pref", "prefix_box", "box",
             "shown", "loaded", "hits"]
    assert len(out) == len(names)
    return dict(zip(names, out))


def test_user_box_mistakes_warn_once_and_keep_the_shown_user(data, monkeypatch):
    """Enter on a bad id, an empty box or a search: one warning per mistake, the box shows
    the shown user's label again, and nothing is re-ranked."""
    import gradio as gr

    from ulmrec.app import handlers, logic, ui
    warnings = []
    monkeypatch.setattr(handlers.gr, "Warning", lambda m: warnings.append(m))
    monkeypatch.setattr(handlers.gr, "Info", lambda m: warnings.append(("info", m)))
    shown = logic.start_user(data)
    label = logic.user_label(data, shown)
    skip = gr.skip()
    for bad, message in (("NOBODY-HERE", "unknown user 'NOBODY-HERE'"), ("", "no user given"),
                         ("   ", "no user given"), ("#99999", "unknown user id 99999")):
        warnings.clear()
        out = _out(ui.on_user(data, bad, shown))
        assert out["status"].startswith(f"⚠️ {message}"), out["status"]
        assert out["box"] == label and out["shown"] == skip and out["loaded"] is False
        assert all(out[k] == skip for k in ("summary", "prefixes", "near", "history"))
        # the page's next step ranks nothing and warns nothing; the Rank button's next step
        # reads the box, which names the shown user again
        assert ui.rank_if_loaded(data, shown, False, out["loaded"]) == (skip,) * 5
        status, *_ = ui.on_rank(data, out["box"], False)
        assert status == "" and len(warnings) == 1, warnings
    # part of a reviewerID: several matches fill the list (no warning), one loads its user
    rids = data.users["reviewerID"]
    part = rids.iloc[0][:2]
    many = rids[rids.str.casefold().str.contains(part.casefold(), regex=False)]
    assert len(many) > 1
    warnings.clear()
    out = _out(ui.on_user(data, part, shown))
    assert out["status"] == "" and out["box"] == label and out["loaded"] is False
    assert set(out["hits"]["choices"]) <= set(logic.user_labels(data, many.index))
    assert f"{len(many)} users match '{part}'" in out["hits"]["label"]
    assert warnings == [("info", f"{len(many)} users match '{part}': pick one in the list "
                                 "under the box")]
    folded = rids.str.casefold()
    one = next(r for r in rids if folded.str.contains(r[:9].casefold(), regex=False).sum() == 1)
    uid = int(data.users.index[rids == one][0])
    out = _out(ui.on_user(data, one[:9].lower(), shown))
    assert out["box"] == logic.user_label(data, uid) and out["shown"] == uid and out["loaded"]
    # the user shown already: the box gets its label, nothing is redrawn or re-ranked
    out = _out(ui.on_user(data, f"#{shown}", shown))
    assert out["box"] == label and out["loaded"] is False and out["summary"] == skip
    out = _out(ui.on_random(data, None, None, "any", shown))
    assert out["loaded"] and out["shown"] != shown and out["box"] == logic.user_label(data, out["shown"])


# ------------------------------------------------------------------ the semantic index

def test_prefix_counts_and_nearest_users_share_the_prefix(data):
    from ulmrec.app.logic import index_chips, nearest_users, prefix_table
    users = data.bundle.users.set_index("user")
    uid = int(users.index[7])
    mine = users.loc[uid, ["a", "b", "c", "d"]].to_numpy(int)
    codes = users[["a", "b", "c", "d"]].to_numpy(int)
    table = prefix_table(data, uid)
    assert list(table["level"]) == ["a", "b", "c", "d"]
    assert table["prefix"].iloc[-1] == users.at[uid, "index"]
    for lv in range(4):
        expect = int((codes[:, : lv + 1] == mine[: lv + 1]).all(axis=1).sum())
        assert table["users sharing it"].iloc[lv] == expect
    assert table["users sharing it"].iloc[0] > table["users sharing it"].iloc[-1] == 1
    chips = index_chips(data, uid)
    assert all(f"&lt;{lv}_{c}&gt;" in chips for lv, c in zip("abcd", mine))

    near = nearest_users(data, uid, k=5)
    assert len(near) == 6 and near["user"].iloc[0].endswith("(this user)")
    assert near["shared levels"].iloc[0] == 4 and near["index"].iloc[0] == users.at[uid, "index"]
    best_other = max(int(np.cumprod(r == mine).sum()) for u, r in zip(users.index, codes) if u != uid)
    for idx, shared, pref in near.iloc[1:][["index", "shared levels", "extracted preference"]].values:
        other = np.array([int(t.split("_")[1]) for t in idx.strip("<>").split("><")])
        assert shared == int(np.cumprod(other == mine).sum())            # really shares it
        assert isinstance(pref, str) and pref
    assert near["shared levels"].iloc[1] == best_other                    # nobody shares more
    assert list(near["shared levels"].iloc[1:]) == sorted(near["shared levels"].iloc[1:], reverse=True)


# ------------------------------------------------------------------ decoding

def test_ladder_has_four_growing_rungs(data):
    from ulmrec.app.logic import ladder, user_preference
    uid = int(data.bundle.users["user"].iloc[3])
    table = ladder(data, uid, max_new_tokens=4)
    assert len(table) == 4
    prefixes = list(table["prefix"])
    for short, long in itertools.pairwise(prefixes):
        assert long.startswith(short) and long.count("<") == short.count("<") + 1
    assert prefixes[-1] == data.bundle.users.set_index("user").at[uid, "index"]
    assert list(table["users sharing it"]) == sorted(table["users sharing it"], reverse=True)
    assert all(isinstance(t, str) and t for t in table["generated preference"])
    assert user_preference(data, uid).startswith("The user")


@pytest.mark.parametrize("bad, message", [
    ("<b_1>", "not an index prefix: '<b_1>'"),
    ("abc", "not an index prefix: 'abc'"),
    ("", "not an index prefix: ''"),
    ("<a_1>junk", "holds text besides"),
    ("<a_999>", "code 999 is outside the codebook"),
    ("<a_1><b_1><c_1><d_1><e_1>", "this index has 4 levels (<a_…> to <d_…>); this prefix has 5"),
    ("<a_1><b_1><c_1><d_1><a_2>", "this index has 4 levels (<a_…> to <d_…>); this prefix has 5"),
    ("<a_1><c_2>", "level b is missing: <a_1> is followed by <c_2>"),
    ("<b_1>", "it starts at level b"),
    ("<a_1><b_2><b_3>", "<b_3> comes after <b_2>"),
])
def test_malformed_prefix_message(data, bad, message):
    from ulmrec.app import ui
    from ulmrec.app.logic import AppError, decode_prefix
    with pytest.raises(AppError, match=re.escape(message)):
        decode_prefix(data, bad)
    status, decoded = ui.on_decode(data, bad)
    assert status.startswith("⚠️ ") and message in status     # plain text: API clients read it
    assert decoded == ""           # the last answer would read as this prefix's


def test_decode_accepts_spaced_prefix(data):
    from ulmrec.app.logic import check_prefix, decode_prefix
    assert check_prefix(" <a_1> <b_2> ") == "<a_1><b_2>"
    assert isinstance(decode_prefix(data, "<a_1> <b_2>", max_new_tokens=3), str)


# ------------------------------------------------------------------ ranking

def test_rank_view_chart_table_and_metrics(data):
    from ulmrec.app.ranking import TARGET, rank_view
    uid = int(data.bundle.users["user"].iloc[0])
    frame, fig, table, metrics = rank_view(data, uid)
    assert frame["prob"].sum() == pytest.approx(1.0, abs=1e-4)
    assert list(frame["letter"]) == list("ABCDEFGHIJKLMNOPQRST")
    target = int(data.bundle.users.set_index("user").at[uid, "target"])
    assert frame["is_target"].sum() == 1 and frame.loc[frame["is_target"], "item"].item() == target
    # the chart: every letter on the y axis, retriever order, the target alone in its colour
    order = list(fig.layout.yaxis.categoryarray)
    assert [lb[0] for lb in order] == list("ABCDEFGHIJKLMNOPQRST")
    # short one-line tick labels (a phone has ~350 px for labels and bars), letters in one
    # column; the full title in the hover text
    from ulmrec.app.ranking import TICK_CHARS
    assert len(set(map(len, order))) == 1 and len(order[0]) <= TICK_CHARS + 4
    for lb, title in zip(order, frame["title"]):
        shown = lb.split(" · ", 1)[1].rstrip("\u00a0")
        assert "<br>" not in lb and (shown == title or (shown.endswith("…") and title.startswith(shown[:-1])))
    hover = {str(t) for tr in fig.data for t in tr.customdata[:, 3]}
    assert hover == set(map(str, frame["title"])) and "customdata[3]" in fig.data[0].hovertemplate
    assert fig.layout.xaxis.nticks <= 5 and fig.layout.xaxis.automargin and fig.layout.yaxis.automargin
    gt = [t for t in fig.data if t.name == "ground truth"]
    assert len(gt) == 1 and gt[0].marker.color == TARGET
    letter = frame.loc[frame["is_target"], "letter"].item()
    assert [y[0] for y in gt[0].y] == [letter]
    assert sum(len(t.y) for t in fig.data) == 20
    np.testing.assert_allclose(sorted(np.concatenate([t.x for t in fig.data])), sorted(frame["prob"]))
    # the table: LLM order, the retriever's rank beside it
    assert list(table["LLM rank"]) == list(range(1, 21))
    assert sorted(table["retriever rank"]) == list(range(1, 21))
    assert (np.diff(table["probability"].to_numpy()) <= 1e-4).all()
    assert table.loc[table["target"] == "✓", "letter"].item() == letter
    # this user's metrics from the target's LLM rank
    r = int(frame.loc[frame["is_target"], "llm_rank"].item())
    llm = metrics.set_index("system").loc["ULMRec"]
    assert llm["target rank"] == r
    assert llm["NDCG@10"] == pytest.approx(round(1 / np.log2(r + 1), 4) if r <= 10 else 0.0)
    assert llm["MRR@5"] == pytest.approx(round(1 / r, 4) if r <= 5 else 0.0)
    assert llm["Recall@10"] == (1.0 if r <= 10 else 0.0)
    retr = metrics.set_index("system").loc["retriever (its own order)"]
    assert retr["target rank"] == int(frame.loc[frame["is_target"], "retriever_rank"].item())
    # the bundle's retriever prior (λ fitted on validation users): its own rank column and row
    assert sorted(table["LLM + prior rank"]) == list(range(1, 21))
    fused = metrics.set_index("system").loc["ULMRec + retriever prior"]
    assert fused["target rank"] == int(frame.loc[frame["is_target"], "fused_rank"].item())


def test_rank_without_history_changes_the_prompt(data):
    from ulmrec.app import ui
    from ulmrec.app.ranking import rank_user
    uid = int(data.bundle.users["user"].iloc[0])
    with_h, without = rank_user(data, uid), rank_user(data, uid, no_history=True)
    assert without["prob"].sum() == pytest.approx(1.0, abs=1e-4)
    assert not np.allclose(with_h["prob"], without["prob"])
    status, fig, _table, metrics, history = ui.on_rank(data, uid, True)
    assert status == "" and "no history" in fig.layout.title.text
    # the page says the history is not used, and the rows say so too
    assert history.startswith("**History not used.**")
    assert list(metrics.data["system"]) == ["ULMRec, index only (no history)", "retriever (its own order)"]
    _, _, _, metrics, history = ui.on_rank(data, uid, False)
    assert "▸" in history and metrics.data["system"].iloc[0] == "ULMRec"


def test_missed_target_scores_zero_and_says_so(data):
    from ulmrec.app.logic import user_summary
    from ulmrec.app.ranking import user_metrics
    uid = int(data.bundle.users["user"].iloc[0])
    missed = _with_missed_target(data, uid)
    assert "not** among the 20 candidates" in user_summary(missed, uid)
    frame = pd.DataFrame({"letter": list("ABC"), "prob": [0.5, 0.3, 0.2],
                          "is_target": [False, False, False], "retriever_rank": [1, 2, 3]})
    m = user_metrics(frame)
    assert (m["target rank"] == "—").all() and (m.drop(columns=["system", "target rank"]) == 0).all().all()
    tied = frame.assign(prob=[0.4, 0.4, 0.2], is_target=[False, True, False])
    llm = user_metrics(tied).set_index("system").loc["ULMRec"]
    assert llm["target rank"] == 2 and llm["MRR@5"] == 0.5          # ties count against the target


# ------------------------------------------------------------------ overview and startup

def test_overview(data):
    from ulmrec.app import overview
    run = data.bundle.manifest.run
    table = overview.results_table(data.bundle.metrics, run)
    systems = list(data.bundle.metrics["results"])
    assert len(table) == 2 * len(systems) and set(table["view"]) == {"Rank", "Overall"}
    labels = overview.system_labels(systems, run)
    assert labels[run] == "ULMRec" and set(table["system"]) == set(labels.values())
    assert not any(s in set(table["system"]) for s in systems if s != "retriever")  # no run names
    row = table[(table["system"] == labels[systems[-1]]) & (table["view"] == "Rank")].iloc[0]
    assert row["NDCG@10"] == round(data.bundle.metrics["results"][systems[-1]]["rank"]["NDCG@10"], 4)
    # the best value per view and column is marked, and only it
    styled = overview.results_styled(table)._compute().ctx
    col = table.columns.get_loc("NDCG@10")
    for view in ("Rank", "Overall"):
        part = table[table["view"] == view]["NDCG@10"]
        marked = {i for i in part.index if styled.get((i, col))}
        assert marked == set(part.index[part == part.max()]) or part.nunique() == 1
    text = overview.dataset_markdown(data)
    assert "| users | 453 |" in text and "| index kind | pid: codes this project learned" in text
    usage = overview.codebook_usage(data)
    users = data.bundle.users
    assert list(usage["codes used"]) == [users[c].nunique() for c in "abcd"]
    fig = overview.codebook_chart(data)
    assert len(fig.data) == 1 + 4
    assert "extractive" in overview.notes_markdown(data)


def test_overview_says_who_and_prints_no_machine_path(data):
    from ulmrec.app import overview
    assert overview.system_labels(["retriever (lrurec)", "backbone (untuned)", "demo", "demo+uid",
                                   "llamarec"], "demo") == {
        "retriever (lrurec)": "retriever (LRURec order)", "backbone (untuned)": "untuned LLM",
        "demo": "ULMRec", "demo+uid": "ULMRec, index only (no history)", "llamarec": "LlamaRec"}
    labels = overview.system_labels(["demo", "ulmrec-long"], "demo")     # two of a kind stay apart
    assert labels == {"demo": "ULMRec", "ulmrec-long": "ULMRec [ulmrec-long]"}
    assert overview.system_labels(["g", "g + retriever prior"], "g") == {
        "g": "ULMRec", "g + retriever prior": "ULMRec + retriever prior"}
    # the command that made the table is for whoever reproduces it: in the collapsed
    # "How to reproduce" accordion, relative to the repository root, not in the caption
    import dataclasses
    cmd = "python -m train.evaluate --config /home/someone/x/runs/g/pipeline/evaluate.yaml"
    metrics = {**data.bundle.metrics, "test_users": 200, "command": cmd}
    cap = overview.results_caption(metrics, overview.results_table(metrics, data.bundle.manifest.run))
    assert "python" not in cap and "`" not in cap and "200 sampled test users" in cap
    how = overview.reproduce_markdown(dataclasses.replace(data, bundle=dataclasses.replace(
        data.bundle, metrics=metrics)))
    assert "/home" not in how and "--config runs/g/pipeline/evaluate.yaml" in how
    assert "python app.py --bundle" in how
    # a fallback to the very source asked for is not a note; one note per meaning
    b = dataclasses.replace(data.bundle, notes=[
        "preferences: 'extractive' texts not on this machine; showing extractive summaries"])
    notes = overview.notes_markdown(dataclasses.replace(data, bundle=b))
    assert "not on this machine" not in notes and notes.count("- ") <= 1 + len(
        {n for r in data.bundle.metrics["results"].values() for n in r.get("notes", [])})


def test_overview_says_plainly_who_wins_and_explains_its_terms(data):
    """Bold marks the best value per column only; when the retriever wins, one plain sentence
    says so; 'release' and 'leak-prone' come with what they mean."""
    import dataclasses

    from ulmrec.app import overview
    from ulmrec.data.release import RELEASE_INDEX_NOTE

    def table(ulmrec, retriever):
        rows = [{"system": name, "view": view, **dict.fromkeys(overview.COLUMNS, value)}
                for view in ("Rank", "Overall") for name, value in (("ULMRec", ulmrec),
                                                                    ("retriever (LRURec order)", retriever))]
        return pd.DataFrame(rows)
    lost = table(0.30, 0.35)
    verdict = overview.results_verdict(lost)
    assert verdict.startswith("On these test users the retriever's own order scores best on every one")
    assert "does not rank the candidates better" in verdict
    assert verdict in overview.results_caption({"test_users": 9}, lost)
    # bold: the retriever's cells (the best per column), and no ULMRec cell
    ctx = overview.results_styled(lost)._compute().ctx
    bold = {i for (i, _), css in ctx.items() if ("font-weight", "bold") in css}
    assert bold == set(lost.index[lost["system"].str.startswith("retriever")])
    mixed = table(0.35, 0.30)
    mixed.loc[0, "MRR@5"] = 0.1
    assert overview.results_verdict(mixed) == "ULMRec scores best on 11 of the 12 metrics."
    assert overview.results_verdict(table(0.3, 0.3)) == ""            # all tie: nothing to say
    # the terms a visitor meets, in plain words
    m = dataclasses.replace(data.bundle.manifest, index_kind="release")
    release = dataclasses.replace(data, bundle=dataclasses.replace(data.bundle, manifest=m))
    assert "| index kind | release: the paper authors' published user indices" in overview.dataset_markdown(release)
    results = {k: {**r, "notes": [RELEASE_INDEX_NOTE]} for k, r in data.bundle.metrics["results"].items()}
    leaky = dataclasses.replace(data.bundle, metrics={**data.bundle.metrics, "results": results})
    notes = overview.notes_markdown(dataclasses.replace(data, bundle=leaky))
    assert "the held-out ones included, so it can leak the answer (leak-prone)" in notes
    assert "it may carry validation/test items" not in notes
    assert "**Leak-prone**" in overview.GLOSSARY and "published user indices" in overview.GLOSSARY


def test_demo_line_says_when_the_served_ranker_is_not_the_evaluated_one(data):
    import dataclasses

    from ulmrec.app.ui import _demo_line
    assert "int8" not in _demo_line(data) and "bfloat16" not in _demo_line(data)
    line = _demo_line(dataclasses.replace(data, int8=True))
    assert "**int8**" in line and "float32" in line
    assert "python" not in _demo_line(data) + line and "`" not in line      # no CLI for visitors
    assert "bfloat16" in _demo_line(dataclasses.replace(data, bf16=True))


def test_start_user_random_and_filters(data):
    from ulmrec.app import logic, ui
    start = logic.start_user(data)
    t = data.users
    ok = t[t["has_candidates"] & t["retrieved"]]
    assert t.at[start, "retrieved"] and t.at[start, "history_len"] == ok["history_len"].max()
    assert start == ok.index[ok["history_len"] == ok["history_len"].max()].min()
    # Random never re-picks the user shown when there is another one
    two = logic.user_choices(data)[:2]
    for _ in range(20):
        assert logic.random_user(two, current=two[0][1]) == two[1][1]
        assert logic.random_user(two, current=two[0][0]) == two[1][1]       # a label works too
    assert logic.random_user(two[:1], current=two[0][1]) == two[0][1]      # the only one
    # a filter that leaves out the shown user: the count and the list say so; the box is not
    # among the filters' outputs, so it keeps the shown user's label
    status, count, hits = ui.on_filter(data, 1000, None, "any")
    assert count == "0 users match" and hits["choices"] == [] and status == ""


def test_long_input_is_not_echoed_whole(data):
    from ulmrec.app import ui
    long = "x" * 10_000
    for status in (ui.on_user(data, long)[0], ui.on_decode(data, long)[0], ui.on_rank(data, long, False)[0],
                   ui.on_decode(data, "<a_1>" + long)[0]):
        assert status.startswith("⚠️ ") and len(status) < 300, status[:300]
        assert status.count("x" * 30) == 1 and "characters)" in status


def test_missing_bundle_exits_2_with_a_message(tmp_path, capsys):
    from ulmrec.app.cli import main
    assert main(["--bundle", str(tmp_path / "nothing")]) == 2
    assert "cannot open the bundle" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _burst(batcher, calls: list, gate, jobs: list, timeout: float = 10) -> None:
    """Run `jobs` (each one rank call) so that the first occupies the model, held at `gate`
    by the fake bundle, until all the others wait in the batcher's queue; then release it."""
    import threading
    threads = [threading.Thread(target=job) for job in jobs]
    threads[0].start()
    while not calls:
        pass
    for th in threads[1:]:
        th.start()
    while len(batcher._pending) < len(threads) - 1:
        pass
    gate.set()
    for th in threads:
        th.join(timeout)


def test_batcher_shares_one_forward_pass_and_matches_single_requests(data):
    import threading

    from ulmrec.app.ranking import RankBatcher
    users = [int(u) for u in data.bundle.users["user"].iloc[:6]]
    alone = {u: data.bundle.rank([u], batch_size=1)[0] for u in users}
    b = RankBatcher(data.bundle)
    assert_frame = pd.testing.assert_frame_equal
    assert_frame(b.rank(users[0]), alone[users[0]], atol=1e-4, check_exact=False)
    assert b.batches == [1]                          # a lone request runs at once, alone
    assert_frame(b.rank(users[0]), alone[users[0]], atol=1e-4, check_exact=False)
    assert b.batches == [1]                          # asked again: from the cache
    gate, calls, real = threading.Event(), [], data.bundle.rank

    class Slow:                                      # holds the first batch until all have queued
        def rank(self, us, **kw):
            calls.append(list(us))
            if len(calls) == 1:
                gate.wait(10)
            return real(us, **kw)
    b = RankBatcher(Slow(), max_batch=6)
    out = {}
    _burst(b, calls, gate, [lambda u=u, f=f: out.__setitem__((u, f), b.rank(u, f))
                            for u in users for f in (False, True)], timeout=60)
    # the first request ran alone; the 11 that waited went as 2 batches (with / without history)
    assert [len(c) for c in calls] == [1, 5, 6] or [len(c) for c in calls] == [1, 6, 5]
    for u in users:
        assert_frame(out[(u, False)], alone[u], atol=1e-4, check_exact=False)
        assert not np.allclose(out[(u, True)]["prob"], alone[u]["prob"])


def test_batcher_groups_waiting_requests_by_prompt_length():
    """Requests that waited together run in batches of similar prompt length, each caller
    answered with its own user's frame."""
    import threading

    from ulmrec.app.ranking import RankBatcher
    gate, calls = threading.Event(), []

    class Fake:
        length = {1: 50, 2: 400, 3: 60, 4: 390, 5: 55, 6: 410, 7: 300}

        def prompt_lengths(self, users, no_history=False):
            return [self.length[u] for u in users]

        def rank(self, users, **kw):
            calls.append(list(users))
            if len(calls) == 1:
                gate.wait(10)
            return [pd.DataFrame({"user": [u]}) for u in users]
    b = RankBatcher(Fake(), max_batch=3, cache=0)
    out = {}
    _burst(b, calls, gate, [lambda u=u: out.__setitem__(u, b.rank(u)) for u in Fake.length])
    assert calls == [[1], [5, 3, 7], [4, 2, 6]]          # 55, 60, 300 | 390, 400, 410 tokens
    assert all(int(out[u]["user"].iloc[0]) == u for u in Fake.length)


@pytest.fixture(scope="module")
def app_url(data):
    """The app served on a free loopback port (concurrency 2), for the API tests."""
    from ulmrec.app.cli import serve
    from ulmrec.app.ui import build_demo
    demo = build_demo(data)
    port = free_port()
    serve(demo, "127.0.0.1", port, concurrency=2, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_twenty_concurrent_rank_requests_all_answer(data, app_url):
    """Loopback load test: 20 clients at once through the queue (concurrency 2)."""
    from gradio_client import Client
    client = Client(app_url, verbose=False)
    users = [int(u) for u in data.bundle.users["user"].iloc[:20]]
    jobs = [client.submit(u, False, api_name="/rank") for u in users]
    results = [j.result(timeout=120) for j in jobs]
    assert len(results) == 20
    for u, (status, _plot, table, metrics, _history) in zip(users, results):
        assert status == ""
        assert len(table["data"]) == 20
        probs = [row[table["headers"].index("probability")] for row in table["data"]]
        assert sum(probs) == pytest.approx(1.0, abs=2e-3)
    assert max(data.rank_batcher.batches) > 1            # requests shared forward passes
    # the API: the four actions, no page plumbing (/partial*), errors as plain text
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/rank", "/ladder", "/decode", "/catalogue"}
    assert not api["unnamed_endpoints"]
    status, _ = client.predict("<a_1><c_2>", api_name="/decode")
    assert status.startswith("⚠️ not an index prefix: '<a_1><c_2>': level b is missing")


API = {"/rank": ["user", "no_history"], "/ladder": ["user"], "/decode": ["prefix"],
       "/catalogue": ["user"]}
# Gradio's names for unnamed things: value_3, param_0, gr.api's '1st'
GENERATED = re.compile(r"(value|param|parameter)(_\d+)?|\d+(st|nd|rd|th)")


def check_api(api: dict, want: dict) -> None:
    """Every endpoint named, its parameters named after the function's, a one-line
    description, every input and output labelled, none with a generated name."""
    eps = api["named_endpoints"]
    assert {k: [p["parameter_name"] for p in v["parameters"]] for k, v in eps.items()} == want
    assert not api["unnamed_endpoints"]
    for name, ep in eps.items():
        desc = ep["description"]
        assert desc and "\n" not in desc and len(desc) < 160, (name, desc)
        assert "partial" not in desc and "keywords" not in desc, (name, desc)
        for param in ep["parameters"]:
            assert param["label"] and not GENERATED.fullmatch(param["parameter_name"]), param
            assert not GENERATED.fullmatch(param["label"]), param
        for ret in ep["returns"]:
            assert ret["label"] and not GENERATED.fullmatch(ret["label"]), (name, ret)


def test_api_names_and_describes_every_endpoint(data, app_url):
    """The API page (gradio_client's view_api, /gradio_api/info): rank, ladder, decode,
    catalogue, each parameter named and typed, each output labelled; docs/app.md's /rank
    example runs as written."""
    import urllib.request

    from gradio import utils
    from gradio_client import Client

    from ulmrec.app import endpoints
    client = Client(app_url, verbose=False)
    api = client.view_api(return_format="dict", print_info=False)
    check_api(api, API)
    info = json.loads(urllib.request.urlopen(app_url + "gradio_api/info", timeout=30).read())
    check_api(info, API)
    rank = api["named_endpoints"]["/rank"]
    assert rank["description"] == "Rank one user's 20 candidates with the LLM: chart, table, metrics and history."
    assert rank["parameters"][0]["python_type"]["type"] == "str"       # not a Literal of every id
    assert [r["label"] for r in rank["returns"]] == [
        "status", "LLM probability per candidate", "candidates by LLM rank", "this user's metrics",
        "history panel"]
    assert [r["label"] for r in api["named_endpoints"]["/decode"]["returns"]] == ["status", "generated preference"]
    # each handler is a function of its own with every parameter described (MCP reads them)
    for make in (endpoints.rank_endpoint, endpoints.ladder_endpoint, endpoints.decode_endpoint,
                 endpoints.catalogue_endpoint):
        fn = make(data)
        desc, params, _ = utils.get_function_description(fn)
        assert f"/{fn.__name__}" in API and list(params) == API[f"/{fn.__name__}"]
        assert all(params.values()), params
    # docs/app.md's example, as written, against this server
    doc = (Path(__file__).parent.parent / "docs" / "app.md").read_text()
    snippet = next(b for b in doc.split("```python")[1:] if "/rank" in b).split("```")[0]
    scope: dict = {}
    exec(snippet.replace("http://127.0.0.1:7860/", app_url), scope)
    assert scope["status"] == "" and len(scope["table"]["data"]) == 20
    assert "user #313" in json.dumps(scope["chart"])


def _with_many_users(data, copies: int):
    """`data` with every user copied `copies` times (new ids and reviewerIDs, the same
    histories and candidates): a bundle with many more users and nothing else new."""
    import dataclasses

    from ulmrec.app.logic import prepare
    b = data.bundle
    n = int(b.users["user"].max())
    users = pd.concat([b.users.assign(user=b.users["user"] + k * n,
                                      reviewerID=b.users["reviewerID"] + (f"X{k}" if k else ""))
                       for k in range(copies)], ignore_index=True)
    cands = pd.concat([b.candidates.assign(user=b.candidates["user"] + k * n) for k in range(copies)],
                      ignore_index=True)
    return prepare(dataclasses.replace(b, users=users, candidates=cands, _task_inputs={},
                                       _model=b._model, _tok=b._tok))


def test_page_config_does_not_grow_with_users(data):
    """The page ships no list of users (the games demo's 15,264 ids made an 827 KB config and
    every click slow): 20 times the users, the same config size, and no reviewerID in it but
    the start user's."""
    from ulmrec.app.ui import build_demo

    def config(d) -> str:
        return json.dumps(build_demo(d).config, default=lambda o: None)
    many = _with_many_users(data, 20)
    assert len(many.users) == 20 * len(data.users)
    small, big = config(data), config(many)
    assert len(big) < 200_000 and abs(len(big) - len(small)) < 0.02 * len(small), (len(small), len(big))
    rids = many.users["reviewerID"].astype(str)
    assert sum(r in big for r in rids) <= 1


def test_batched_ladder_matches_one_decode_per_prefix(data):
    from ulmrec.app.logic import ladder
    uid = int(data.bundle.users["user"].iloc[5])
    # the tiny model writes ~20 newlines before any word: 28 tokens reach the words
    table = ladder(data, uid, max_new_tokens=28)
    one_by_one = [data.bundle.decode(p, max_new_tokens=28) or "(empty)" for p in table["prefix"]]
    assert list(table["generated preference"]) == one_by_one
    assert any(t != "(empty)" for t in one_by_one)


def test_whole_catalogue_tab_generates_real_unseen_items(data):
    from ulmrec.app import catalogue
    from ulmrec.app.logic import AppError
    bundle = data.bundle
    assert bundle.has_lcrec and bundle.manifest.lcrec["items"] == len(bundle.items)
    assert "lcrec/adapter_model.safetensors" in bundle.manifest.files
    # both parts add the same index tokens to the same tokenizer: one copy travels
    assert bundle.manifest.lcrec["tokenizer"] == "shared"
    assert not (bundle.root / "lcrec" / "tokenizer.json").exists()
    user = int(data.users.index[7])
    summary, table = catalogue.catalogue_view(data, user)
    assert 0 < len(table) <= catalogue.TOPN and "LC-Rec generated" in summary
    index = dict(zip(bundle.lcrec_items["item"], bundle.lcrec_items["index"]))
    by_index = {v: k for k, v in index.items()}
    items = [by_index[s] for s in table["item index"]]        # every answer is a catalogue item
    history = set(bundle.users.set_index("user").at[user, "history"])
    assert len(set(items)) == len(items) and not history & set(items)
    assert table["title"].tolist() == [data.titles[i] for i in items]
    logp = table["log-probability"].to_numpy()
    assert np.all(np.diff(logp) <= 1e-3) and np.all(logp <= 0)
    cands = set(data.test_candidates[user])
    assert (table["in retriever's 20"] == "✓").tolist() == [i in cands for i in items]
    target = int(bundle.users.set_index("user").at[user, "target"])
    assert (table["target"] == "✓").tolist() == [i == target for i in items]
    assert ("rank **" in summary) == (target in items)
    # a bundle without the part says how to make one
    from dataclasses import replace
    bare = replace(data, bundle=replace(bundle, lcrec_items=None))
    with pytest.raises(AppError, match="no LC-Rec part"):
        catalogue.catalogue_view(bare, user)


def test_rank_takes_prompts_built_once(data):
    """A burst measures its prompts' lengths and ranks them from the same built examples:
    the same frames as building them inside rank; prompts of other users are refused."""
    users = [int(u) for u in data.bundle.users["user"].iloc[:3]]
    examples, _ = data.bundle.examples(users)
    assert data.bundle.prompt_lengths(users, examples=examples) == data.bundle.prompt_lengths(users)
    got = data.bundle.rank(users, batch_size=3, examples=examples)
    want = data.bundle.rank(users, batch_size=3)
    for a, b in zip(got, want):
        pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="not the users' prompts"):
        data.bundle.rank(users[::-1], examples=examples)


def test_reexport_carries_the_lcrec_part_of_an_existing_bundle(data, tmp_path, monkeypatch):
    """--lcrec <bundle>/lcrec: a bundle re-exported (e.g. with a retrained ranker) keeps its
    LC-Rec model as it was, tokenizer still shared."""
    import filecmp

    from train import export
    from ulmrec.bundle import load_bundle
    old = data.bundle.root
    monkeypatch.setenv("ULMREC_RUNS", str(old.parent / "runs"))
    out = tmp_path / "again"
    assert export.main(["--dataset", "gift-cards", "--run-name", "t", "--results-dir",
                        str(old.parent / "results"), "--out", str(out), "--lcrec", str(old / "lcrec")]) == 0
    again = load_bundle(out)
    assert again.manifest.lcrec == data.bundle.manifest.lcrec
    assert filecmp.cmp(out / "lcrec" / "adapter_model.safetensors", old / "lcrec" / "adapter_model.safetensors",
                       shallow=False)
    assert again.lcrec_items.equals(data.bundle.lcrec_items)
