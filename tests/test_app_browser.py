"""The served app in a real headless browser (Debian's chromium via Playwright, no download):
the first screen, the decode ladder, ranking, the whole catalogue, bad input, a phone-wide
page and the chart at 390 px. Each test keeps a screenshot under test-output/browser/ (or
$ULMREC_TEST_OUTPUT)."""
import json
import os
import urllib.request
from pathlib import Path

import pytest
from test_app import build_tiny_bundle, free_port

from ulmrec.app import logic

CHROMIUM = os.environ.get("ULMREC_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LETTERS = list("ABCDEFGHIJKLMNOPQRST")
TARGET_FILL = "rgb(228, 87, 46)"   # ulmrec.app.ranking.TARGET
SHOTS = Path(os.environ.get("ULMREC_TEST_OUTPUT",
                            Path(__file__).resolve().parents[1] / "test-output")) / "browser"


pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} not found (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, AppData): the app on a free loopback port, in this process."""
    from ulmrec.app.cli import open_app, serve
    data, demo = open_app(build_tiny_bundle(tmp_path_factory.getbasetemp()))
    port = free_port()
    serve(demo, "127.0.0.1", port, concurrency=2, block=False)
    yield f"http://127.0.0.1:{port}", data
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _page(browser, url: str, width: int = 1400, height: int = 2200):
    pg = browser.new_page(viewport={"width": width, "height": height})
    pg.set_default_timeout(60_000)
    outside: list[str] = []

    def loopback_only(route):        # the page must work offline: record, then refuse
        if route.request.url.startswith(url):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()
    pg.route("**/*", loopback_only)
    pg.outside = outside
    return pg


@pytest.fixture
def page(browser, served):
    pg = _page(browser, served[0])
    yield pg
    pg.close()


def shot(page, name: str, full_page: bool = True) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.stat().st_size > 10_000
    return path


def _ticks(page) -> list[str]:
    return [e.text_content() for e in page.query_selector_all("#chart .ytick text")]


def _wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text])


def _toast(page) -> str:
    page.wait_for_selector(".toast-wrap .toast-item", state="visible")
    return page.inner_text(".toast-wrap")


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#chart .ytick text")        # the start user is ranked on load


def _box(page, selector: str) -> dict:
    return page.locator(selector).first.bounding_box()


def _close_toasts(page) -> None:
    items = page.locator(".toast-wrap .toast-item")
    while items.count():
        n = items.count()
        page.locator(".toast-wrap .toast-close").first.click()
        page.wait_for_function("n => document.querySelectorAll('.toast-wrap .toast-item').length < n",
                               arg=n)


def _one_toast(page, text: str) -> str:
    """The toast holding `text`, once: waits past the chained step that used to warn again."""
    page.wait_for_function("t => (document.querySelector('.toast-wrap')?.innerText || '')"
                           ".includes(t)", arg=text)
    page.wait_for_timeout(1500)
    items = page.locator(".toast-wrap .toast-item")
    assert items.count() == 1, page.inner_text(".toast-wrap")
    return items.first.inner_text()


def _cut_headers(page, ids) -> list[str]:
    """Headers of the tables `ids` whose text does not fit their cell ('shared l', 'MRR@1')."""
    return page.evaluate("""ids => ids.flatMap(id => [...document.querySelectorAll(
        `#${id} thead th span.header`)].filter(s => s.scrollWidth > s.clientWidth + 1)
        .map(s => `${id}: ${s.textContent}`))""", ids)


def _inner_scroll(page, table: str) -> list:
    """[scrollHeight, clientHeight] of the table's scroll box when it hides rows, else []."""
    return page.evaluate("""s => { const v = document.querySelector(`${s} .virtual-table-viewport`);
        return v.scrollHeight > v.clientHeight + 1 ? [v.scrollHeight, v.clientHeight] : []; }""",
                         table)


def _rows_in_view(page, table: str) -> int:
    """Rows of the table drawn inside its scroll box (a hidden row is outside it)."""
    return page.evaluate("""s => { const v = document.querySelector(`${s} .virtual-table-viewport`)
        .getBoundingClientRect();
        return [...document.querySelectorAll(`${s} .virtual-row`)].filter(r => {
            const b = r.getBoundingClientRect();
            return b.height > 0 && b.top >= v.top - 1 && b.bottom <= v.bottom + 1; }).length; }""",
                         table)


CHART_BOXES = """() => {
    const box = e => { const b = e.getBoundingClientRect();
                       return {l: b.left, r: b.right, t: b.top, b: b.bottom, text: e.textContent}; };
    const q = s => [...document.querySelectorAll(`#chart ${s}`)].map(box);
    return {svg: q('.main-svg')[0], chart: box(document.querySelector('#chart')),
            plot: q('.nsewdrag')[0], yticks: q('.ytick text'), xticks: q('.xtick text'),
            xtitle: q('.xtitle')[0], title: q('.gtitle')[0], legend: q('.legend')[0],
            width: window.innerWidth}; }"""


def _chart_problems(page) -> list[str]:
    """What is unreadable in the ranking chart: a text box cut by the figure or the page, tick
    labels over each other or over the bars, the title under the legend."""
    g = page.evaluate(CHART_BOXES)
    svg, plot, problems = g["svg"], g["plot"], []
    right = min(svg["r"], g["chart"]["r"], g["width"])

    def inside(b, what):
        if b["l"] < max(svg["l"], 0) - 0.5 or b["r"] > right + 0.5 or b["t"] < svg["t"] - 0.5 \
                or b["b"] > svg["b"] + 0.5:
            problems.append(f"{what} {b['text']!r} cut: {b} in {svg}")

    def apart(boxes, what, axis):
        lo, hi = ("t", "b") if axis == "y" else ("l", "r")
        boxes = sorted(boxes, key=lambda b: b[lo])
        for a, b in zip(boxes, boxes[1:]):
            if a[hi] > b[lo] + 0.5:
                problems.append(f"{what} overlap: {a['text']!r} and {b['text']!r}")
    for b in g["yticks"]:
        inside(b, "y tick")
        if b["r"] > plot["l"] + 1:
            problems.append(f"y tick {b['text']!r} runs into the bars")
    for b in g["xticks"]:
        inside(b, "x tick")
    for key in ("xtitle", "title", "legend"):
        inside(g[key], key)
    apart(g["yticks"], "y ticks", "y")
    apart(g["xticks"], "x ticks", "x")
    t, lg = g["title"], g["legend"]
    if t["l"] < lg["r"] and lg["l"] < t["r"] and t["t"] < lg["b"] and lg["t"] < t["b"]:
        problems.append("the title and the legend overlap")
    if len(g["yticks"]) != 20 or not 2 <= len(g["xticks"]) <= 6:
        problems.append(f"{len(g['yticks'])} y ticks, {len(g['xticks'])} x ticks")
    return problems


def _pick_by_search(page, data, uid: int) -> None:
    """Type the start of `uid`'s reviewerID, Enter, and pick it in the list of matches."""
    rids = data.users["reviewerID"].astype(str)
    rid = rids[uid]
    for k in range(2, len(rid) + 1):       # a start several users share, uid among the first 50
        n, ids = logic.search_users(data, rid[:k])
        if n > 1 and uid in ids:
            break
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially(rid[:k], delay=30)
    page.keyboard.press("Enter")
    _wait_text(page, "#user-hits", f"{n} users match '{rid[:k]}'")
    page.click("#user-hits input")
    page.get_by_role("option", name=logic.user_label(data, uid), exact=True).click()


def test_first_screen(page, served):
    url, data = served
    from ulmrec.app import logic
    _open(page, url)
    intro = page.inner_text("#intro")
    for word in ("retriever", "user index", "LLM", "letter"):
        assert word in intro
    # the start user follows the stated rule, and the page states it
    start = logic.start_user(data)
    assert page.input_value("#user input") == logic.user_label(data, start)
    assert "longest history" in page.inner_text("#start-rule")
    # beside the one user, how often the served model moved the real item up, left it, or down
    moved = data.bundle.outcomes["moved"].value_counts()
    rule = page.inner_text("#start-rule")
    assert f"up for {moved.get('up', 0)}" in rule and f"down for {moved.get('down', 0)}" in rule
    assert f"#{start}" in page.inner_text("#chart")
    # every table and chart on the tab has a one-line caption
    for key in ("chart", "metrics", "table", "history", "prefixes", "near", "ladder"):
        assert page.inner_text(f"#cap-{key}").startswith(("How to read it", "Type any"))
    # metrics rows say what they are; the better value is bold
    _wait_text(page, "#metrics", "retriever (its own order)")
    assert "ULMRec" in page.inner_text("#metrics")
    # the legend sits clear of the x-axis title
    legend, xtitle = _box(page, "#chart .legend"), _box(page, "#chart .xtitle")
    assert legend["y"] + legend["height"] <= xtitle["y"] or legend["y"] >= xtitle["y"] + xtitle["height"]
    # the status line does not repeat what a toast says
    assert not page.locator("#status").is_visible()
    # the config ships no list of users: its size does not grow with them (~827 KB on games
    # with its 15,264 ids in a dropdown)
    config = urllib.request.urlopen(f"{url}/config", timeout=30).read().decode()
    assert len(config) < 200_000, len(config)
    assert sum(r in config for r in data.users["reviewerID"]) <= 1          # the start user
    json.loads(config)
    assert "the LLM moved it down" in config           # the filter has a choice for each group
    shot(page, "1-first-screen")
    assert page.outside == [], f"the page fetched outside resources: {page.outside[:5]}"


def test_decode_ladder(page, served):
    url, data = served
    _open(page, url)
    page.click("#ladder-btn")
    page.wait_for_function("() => document.querySelectorAll('#ladder .virtual-row').length >= 4")
    # every rung drawn, none behind an inner scroll box; every header in full
    page.wait_for_timeout(500)
    assert _inner_scroll(page, "#ladder") == [] and _rows_in_view(page, "#ladder") == 4
    assert _cut_headers(page, ["ladder", "prefixes", "near"]) == []
    rows = page.inner_text("#ladder")
    index = data.bundle.users.set_index("user").at[
        int(page.input_value("#user input").rsplit("#", 1)[1]), "index"]
    assert index in rows
    if "what these users share" in rows:            # the data profile beside each rung
        assert "top items" in rows
    page.fill("#prefix-box textarea", index[: index.index(">") + 1])
    page.click("#decode-btn")
    page.wait_for_function("() => document.querySelector('#decoded textarea').value.length > 0")
    page.locator("#ladder").scroll_into_view_if_needed()
    shot(page, "2-decode-ladder")


def test_rank_a_picked_user(page, served):
    url, data = served
    users = data.bundle.users.set_index("user")
    _open(page, url)
    # pick a user by typing part of the reviewerID: the server lists the matches
    uid = int(users.index[40])
    rid = users.at[uid, "reviewerID"]
    _pick_by_search(page, data, uid)
    _wait_text(page, "#summary", rid)
    _wait_text(page, "#chart", f"user #{uid}")           # picking it ranks it
    assert page.input_value("#user input") == logic.user_label(data, uid)
    page.click("#rank-btn")
    _wait_text(page, "#chart", f"user #{uid}")
    ticks = _ticks(page)
    assert sorted(t.split(" · ")[0] for t in ticks) == LETTERS
    fills = [e.evaluate("el => getComputedStyle(el).fill")
             for e in page.query_selector_all("#chart .bars path")]
    assert len(fills) == 20 and fills.count(TARGET_FILL) == 1
    # one-line tick labels, readable at this width too; the full title on hover
    assert not page.query_selector_all("#chart .ytick text tspan.line")
    assert _chart_problems(page) == []
    target = data.titles[int(users.at[uid, "target"])]
    bar = _box(page, f"#chart .bars path >> nth={fills.index(TARGET_FILL)}")
    page.mouse.move(bar["x"] + bar["width"] / 2, bar["y"] + bar["height"] / 2)  # plotly's drag layer covers the bars
    page.wait_for_function("t => (document.querySelector('#chart .hoverlayer')?.textContent || '')"
                           ".includes(t)", arg=str(target)[:40])
    _wait_text(page, "#table", target)
    _wait_text(page, "#history", "▸")
    # all 20 candidates drawn, the real next item (✓) too, with no inner scroll box
    assert _inner_scroll(page, "#table") == [] and _rows_in_view(page, "#table") == 20
    tick = page.locator("#table .body-cell", has_text="✓")
    assert tick.count() == 1 and tick.is_visible()
    assert _cut_headers(page, ["table", "metrics", "prefixes", "near"]) == []
    shot(page, "3-ranking")
    # without history: the panel says so and the rows are labelled for it
    page.check("#no-history input")
    _wait_text(page, "#history", "History not used")
    _wait_text(page, "#metrics", "index only (no history)")
    _wait_text(page, "#chart", "no history")
    shot(page, "3b-ranking-no-history")
    page.uncheck("#no-history input")
    _wait_text(page, "#history", "▸")


def test_random_and_filters_keep_a_labelled_user(page, served):
    url, data = served
    _open(page, url)
    shown = page.input_value("#user input")
    page.click("#random")                   # never the user already shown
    page.wait_for_function("v => document.querySelector('#user input').value !== v", arg=shown)
    now = page.input_value("#user input")
    assert " · #" in now
    _wait_text(page, "#summary", now.split(" · #")[0])
    # a filter that excludes the shown user: the box keeps the label, not a bare id
    page.get_by_text("Filters", exact=True).click()
    page.get_by_label("no", exact=True).check()
    _wait_text(page, "#component-0, body", "0 users match")
    _wait_text(page, "#user-hits", "0 users match the filters")
    assert page.input_value("#user input") == now
    # Random draws on the server from the filters: none left, one warning, the user stays
    page.click("#random")
    assert "no user matches these filters" in _one_toast(page, "no user matches")
    assert page.input_value("#user input") == now
    _wait_text(page, "#summary", now.split(" · #")[0])


def test_whole_catalogue_tab(page, served):
    url, data = served
    _open(page, url)
    user = int(page.input_value("#user input").rsplit("#", 1)[1])
    page.get_by_role("tab", name="Whole catalogue (LC-Rec)").click()
    page.wait_for_selector("#catalogue-btn")
    assert not page.locator("#catalogue-table").is_visible()     # no empty "1 2 3" table
    page.click("#catalogue-btn")
    _wait_text(page, "#catalogue-summary", f"for user #{user}")
    top = data.bundle.recommend_catalogue(user)          # the page shows what the bundle says
    for title, index in zip(top["title"][:3], top["index"][:3]):
        _wait_text(page, "#catalogue-table", index)
        _wait_text(page, "#catalogue-table", str(title)[:20])
    assert page.locator("#catalogue-table").is_visible()
    page.wait_for_function("() => !document.querySelector('#catalogue-table .pending, "
                           "#catalogue-table.pending')")
    page.wait_for_timeout(500)
    shot(page, "4-whole-catalogue")
    assert page.outside == []


def test_bad_input(browser, served):
    url, _ = served
    page = _page(browser, url, width=1400, height=900)
    _open(page, url)
    # a missing level is named
    page.fill("#prefix-box textarea", "<a_1><c_2>")
    page.click("#decode-btn")
    assert "level b is missing" in _toast(page)
    page.locator(".toast-wrap .toast-close").first.click()
    # a 10,000-character paste is quoted once, cut short
    page.fill("#prefix-box textarea", "x" * 10_000)
    page.click("#decode-btn")
    page.wait_for_function("() => (document.querySelector('.toast-wrap')?.innerText || '')"
                           ".includes('10,000 characters')")
    text = page.inner_text(".toast-wrap")
    assert text.count("x" * 30) == 1 and len(text) < 600
    body = page.inner_text("body")
    assert body.count("10,000 characters") == 1                  # not repeated on the page
    page.locator("#prefix-box").scroll_into_view_if_needed()
    page.wait_for_timeout(800)                                   # the toast's fade-in
    shot(page, "5-bad-input", full_page=False)                   # the toast is fixed to the view
    _close_toasts(page)
    # a rejected prefix clears the text decoded for the previous one
    page.fill("#prefix-box textarea", "<a_1>")
    page.click("#decode-btn")
    page.wait_for_function("() => document.querySelector('#decoded textarea').value.length > 0")
    page.fill("#prefix-box textarea", "<a_1><b_1><c_1><d_1><e_1>")
    page.click("#decode-btn")
    assert "this index has 4 levels (<a_…> to <d_…>); this prefix has 5" in _one_toast(page, "4 levels")
    page.wait_for_function("() => document.querySelector('#decoded textarea').value === ''")
    _close_toasts(page)
    # an unknown user: one warning (the chained ranking does not warn again), and the box
    # shows the user the page shows again
    shown = page.input_value("#user input")
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially("NOBODY-HERE", delay=20)
    page.keyboard.press("Enter")
    _one_toast(page, "unknown user 'NOBODY-HERE'")
    page.wait_for_function("v => document.querySelector('#user input').value === v", arg=shown)
    page.locator("#user").scroll_into_view_if_needed()
    shot(page, "5b-bad-user", full_page=False)
    _close_toasts(page)
    # an emptied box warns and keeps the user (it used to load user #1 silently)
    page.fill("#user input", "")
    page.keyboard.press("Enter")
    assert "no user given" in _one_toast(page, "no user given")
    page.wait_for_function("v => document.querySelector('#user input').value === v", arg=shown)
    assert f"user #{shown.rsplit('#', 1)[1]}" in page.inner_text("#chart")
    _close_toasts(page)
    # a bad id then a click on Rank, no Enter: looked up first, one warning, the user stays
    page.fill("#user input", "NOBODY-AGAIN")
    page.click("#rank-btn")
    _one_toast(page, "unknown user 'NOBODY-AGAIN'")
    page.wait_for_function("v => document.querySelector('#user input').value === v", arg=shown)
    page.close()


def test_phone_width(browser, served):
    url, _ = served
    page = _page(browser, url, width=420, height=2400)
    try:
        _open(page, url)
        _wait_text(page, "#table", "LLM rank")
        # table cells keep readable widths (the table scrolls sideways) instead of one letter
        # per line
        widths = page.eval_on_selector_all("#table thead th, #metrics thead th",
                                           "els => els.map(e => e.getBoundingClientRect().width)")
        assert widths and min(widths) >= 40, widths
        heights = page.eval_on_selector_all("#metrics .virtual-row",
                                            "els => els.map(e => e.getBoundingClientRect().height)")
        assert heights and max(heights) < 80, heights
        assert _cut_headers(page, ["table", "metrics", "prefixes", "near"]) == []
        assert _inner_scroll(page, "#table") == []
        shot(page, "6-phone-420px")
    finally:
        page.close()


def test_chart_at_390px(browser, served):
    """The ranking chart on a 390 px phone: every tick label, the axis title, the title and
    the legend inside the figure, none over another or over the bars."""
    url, _ = served
    page = _page(browser, url, width=390, height=1600)
    try:
        _open(page, url)
        page.wait_for_timeout(500)                   # plotly's automargin pass
        assert _chart_problems(page) == []
        page.locator("#chart").scroll_into_view_if_needed()
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / "6b-chart-390px.png"
        page.locator("#chart").screenshot(path=str(path))
        assert path.stat().st_size > 10_000
    finally:
        page.close()
