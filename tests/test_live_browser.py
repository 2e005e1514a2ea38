"""The "Your own history" tab in a real headless browser (Debian's chromium via Playwright): a
history picked from the catalogue search returns 20 ranked candidates, an index with its
shared-prefix counts and a ladder; markup in the text stays text; bad input warns once."""
import pytest
from test_app_browser import CHROMIUM, _page, _toast, shot  # noqa: F401
from test_app_browser import browser  # noqa: F401  (fixture)
from test_live import bundle  # noqa: F401  (fixture: the tiny bundle with retriever + indexer)

from test_app import free_port

pytestmark = pytest.mark.skipif(not __import__("pathlib").Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} not found (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def served(bundle):  # noqa: F811
    from ulmrec.app.logic import prepare
    from ulmrec.app.serving import serve
    from ulmrec.app.ui import build_demo
    demo = build_demo(prepare(bundle))
    port = free_port()
    serve(demo, "127.0.0.1", port, concurrency=2, block=False)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def test_own_history_in_the_browser(browser, served, bundle):  # noqa: F811
    page = _page(browser, served, width=1400, height=2400)
    page.goto(served)
    page.get_by_role("tab", name="Your own history").click()
    word = bundle.items["title"].iloc[0].split()[0]
    page.locator("#own-search textarea").press_sequentially(word, delay=30)
    page.keyboard.press("Enter")
    page.wait_for_function("() => (document.querySelector('#own-hits input')?.value || '').length > 0")
    page.click("#own-add")
    page.wait_for_function("() => (document.querySelector('#own-history textarea')?.value || '').length > 0")
    history = page.input_value("#own-history textarea")
    page.fill("#own-history textarea", history + "\n3")
    page.fill("#own-text textarea", "<img src=x onerror=alert(1)> likes <b>gifts</b>")
    page.click("#own-go")
    page.wait_for_selector("#own-summary .ulm-chip")
    shot(page, "7-own-history")
    _wait_visible_text(page, "#own-candidates", "LLM probability")
    # every one of the 20 titles drawn, the last row too (no inner scroll box hides it)
    want = bundle.recommend((history + "\n3").splitlines(), page.input_value("#own-text textarea"),
                            ladder=False).candidates.sort_values("llm_rank")["title"].tolist()
    shown = page.inner_text("#own-candidates")
    assert all(t in shown for t in want), [t for t in want if t not in shown]
    assert page.locator("#own-summary img").count() == 0 and page.locator("#own-summary b").count() == 0
    assert "users sharing it" in page.inner_text("#own-shared")
    assert page.inner_text("#own-ladder").count("<a_") >= 3            # 3 rungs of the tiny index
    assert page.locator("#own-tab").is_visible() and page.get_by_role("tab", name="Overview").count() == 1
    # an empty history warns, once, and leaves the answer shown
    page.fill("#own-history textarea", "")
    page.click("#own-go")
    assert "empty" in _toast(page)
    assert page.inner_text("#own-summary")                          # the answer stays
    assert not page.outside                                          # nothing left loopback
    page.close()


def _wait_visible_text(page, selector: str, text: str) -> None:
    page.wait_for_function("([s, t]) => (document.querySelector(s)?.innerText || '').includes(t)",
                           arg=[selector, text])


def test_every_endpoint_is_named_and_described(served):
    """With /recommend too: each endpoint, parameter and output named, a one-line description
    (the API page of a bundle that carries its retriever)."""
    from gradio_client import Client

    from test_app import API, check_api
    api = Client(served, verbose=False).view_api(return_format="dict", print_info=False)
    want = {k: v for k, v in API.items() if k != "/catalogue"}     # no LC-Rec part here
    check_api(api, {**want, "/recommend": ["history", "text", "ladder"]})
    rec = api["named_endpoints"]["/recommend"]
    assert [p["label"] for p in rec["parameters"]] == ["history", "text", "ladder"]
    assert [r["label"] for r in rec["returns"]] == ["recommendation"]
    assert rec["description"].startswith("Recommend items for a new user from their history")
