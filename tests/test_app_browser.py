"""The served app in a real headless browser (Debian's chromium via Playwright, no download):
the first screen, the decode ladder, ranking, the whole catalogue, bad input and a phone-wide
page. Each test keeps a screenshot under test-output/browser/ (or $ULMREC_TEST_OUTPUT)."""
import os
from pathlib import Path

import pytest
from test_app import build_tiny_bundle, free_port

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
    shot(page, "1-first-screen")
    assert page.outside == [], f"the page fetched outside resources: {page.outside[:5]}"


def test_decode_ladder(page, served):
    url, data = served
    _open(page, url)
    page.click("#ladder-btn")
    page.wait_for_function("() => document.querySelectorAll('#ladder .virtual-row').length >= 4")
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
    # pick a user by typing part of the reviewerID into the searchable dropdown
    uid = int(users.index[40])
    rid = users.at[uid, "reviewerID"]
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially(rid[:7], delay=30)
    page.get_by_role("option", name=f"{rid} · #{uid}").click()
    _wait_text(page, "#summary", rid)
    page.click("#rank-btn")
    _wait_text(page, "#chart", f"user #{uid}")
    ticks = _ticks(page)
    assert sorted(t.split(" · ")[0] for t in ticks) == LETTERS
    fills = [e.evaluate("el => getComputedStyle(el).fill")
             for e in page.query_selector_all("#chart .bars path")]
    assert len(fills) == 20 and fills.count(TARGET_FILL) == 1
    # long titles wrap onto a second line instead of being cut at 30 characters
    titles = [data.titles[int(i)] for i in data.test_candidates[uid]]
    if any(len(t) > 34 for t in titles):
        assert page.query_selector_all("#chart .ytick text tspan.line")
    _wait_text(page, "#table", data.titles[int(users.at[uid, "target"])])
    _wait_text(page, "#history", "▸")
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
    page.get_by_text("Filters").click()
    page.get_by_label("no", exact=True).check()
    _wait_text(page, "#component-0, body", "0 users match")
    assert page.input_value("#user input") == now


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
    # an unknown user
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially("NOBODY-HERE", delay=20)
    page.keyboard.press("Enter")
    page.wait_for_function("() => (document.querySelector('.toast-wrap')?.innerText || '')"
                           ".includes(\"unknown user 'NOBODY-HERE'\")")


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
        shot(page, "6-phone-420px")
    finally:
        page.close()
