"""The served app in a real headless browser (Debian's chromium via Playwright, no download):
pick a user, decode a level, rank, read the bar chart's letters from the plotly DOM."""
import os
from pathlib import Path

import pytest
from test_app import build_tiny_bundle, free_port

CHROMIUM = os.environ.get("ULMREC_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LETTERS = list("ABCDEFGHIJKLMNOPQRST")
TARGET_FILL = "rgb(228, 87, 46)"   # ulmrec.app.ranking.TARGET


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


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright
    url = served[0]
    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 2200})
        pg.set_default_timeout(60_000)

        def loopback_only(route):        # the page must work offline: record, then refuse
            if route.request.url.startswith(url):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()
        pg.route("**/*", loopback_only)
        pg.outside = outside
        yield pg
        browser.close()


def _ticks(page) -> list[str]:
    return [e.text_content() for e in page.query_selector_all("#chart .ytick text")]


def _wait_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text])


def test_pick_decode_rank_in_a_browser(page, served, tmp_path):
    url, data = served
    users = data.bundle.users.set_index("user")
    page.goto(url)
    page.wait_for_selector("#chart .ytick text")        # first user ranked on load
    assert sorted(t.split(" · ")[0] for t in _ticks(page)) == LETTERS

    # pick a user by typing part of the reviewerID into the searchable dropdown
    uid = int(users.index[40])
    rid = users.at[uid, "reviewerID"]
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially(rid[:7], delay=30)
    page.get_by_role("option", name=f"{rid} · #{uid}").click()
    _wait_text(page, "#summary", rid)
    index = users.at[uid, "index"]
    first = index[: index.index(">") + 1]
    page.wait_for_function("p => document.querySelector('#prefix-box textarea').value === p",
                           arg=first)

    # decode the first level
    page.click("#decode-btn")
    page.wait_for_function("() => document.querySelector('#decoded textarea').value.length > 0")
    assert page.input_value("#decoded textarea").strip()

    # a malformed prefix gives a clear message and leaves the server serving
    page.fill("#prefix-box textarea", "<b_1>")
    page.click("#decode-btn")
    _wait_text(page, "#status", "not an index prefix: '<b_1>'")

    # rank: the chart carries the 20 letters, the ground truth alone in its colour
    page.click("#rank-btn")
    _wait_text(page, "#chart", f"user #{uid}")
    ticks = _ticks(page)
    assert sorted(t.split(" · ")[0] for t in ticks) == LETTERS
    fills = [e.evaluate("el => getComputedStyle(el).fill")
             for e in page.query_selector_all("#chart .bars path")]
    assert len(fills) == 20 and fills.count(TARGET_FILL) == 1
    target_title = data.titles[int(users.at[uid, "target"])]
    _wait_text(page, "#table", target_title)
    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000
    assert page.outside == [], f"the page fetched outside resources: {page.outside[:5]}"


def test_random_user_and_unknown_user(page, served):
    page.goto(served[0])
    page.wait_for_selector("#chart .ytick text")
    page.click("#random")           # the summary follows whichever user the dropdown now shows
    page.wait_for_function(
        "() => { const v = document.querySelector('#user input').value;"
        "        const s = document.querySelector('#summary').innerText;"
        "        return v.includes(' · #') && s.includes(v.split(' · #')[0]); }")
    page.fill("#user input", "")
    page.locator("#user input").press_sequentially("NOBODY-HERE", delay=20)
    page.keyboard.press("Enter")
    _wait_text(page, "#status", "unknown user 'NOBODY-HERE'")


def test_whole_catalogue_tab_in_a_browser(page, served):
    url, data = served
    page.goto(url)
    page.wait_for_selector("#chart .ytick text")
    user = int(page.input_value("#user input").rsplit("#", 1)[1])
    page.get_by_role("tab", name="Whole catalogue (LC-Rec)").click()
    page.click("#catalogue-btn")
    _wait_text(page, "#catalogue-summary", f"for user #{user}")
    top = data.bundle.recommend_catalogue(user)          # the page shows what the bundle says
    for title, index in zip(top["title"][:3], top["index"][:3]):
        _wait_text(page, "#catalogue-table", index)
        _wait_text(page, "#catalogue-table", str(title)[:20])
    assert page.outside == []
