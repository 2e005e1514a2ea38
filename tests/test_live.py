"""A history not in the table (ulmrec.live): a tiny but complete pipeline over the real
gift-cards data — LRURec, a P-ID index from the packaged MiniLM, a 2-step ranker and decode
adapter on a seeded random Llama — exported with its retriever and indexer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_run import train_and_evaluate, train_tiny_retriever

from train import export, finetune
from train import index as index_cli
from ulmrec.bundle import BundleError, load_bundle
from ulmrec.indexing.table import level_letter, parse_token_string
from ulmrec.live import MAX_ITEMS, MAX_TEXT, NEW_USER, InputError, predict_index, resolve_history
from ulmrec.model import encode
from ulmrec.paths import sha256_file
from ulmrec.prompts import INSTRUCTIONS, history_line
from ulmrec.tasks import Example

ARGS = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "lrurec", "--index-kind", "pid",
        "--preference-source", "extractive", "--max-history", "3", "--max-title-words", "4",
        "--max-len", "256"]
INDEX = ["--epochs", "60", "--codebook-size", "64", "--levels", "3", "--e-dim", "8",
         "--hidden", "64", "--batch-size", "256", "--kmeans-iters", "10"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    mp = pytest.MonkeyPatch()
    mp.setenv("ULMREC_RUNS", str(root / "runs"))
    try:
        train_tiny_retriever()
        assert index_cli.main(["--dataset", "gift-cards", *INDEX]) == 0
        train_and_evaluate(ARGS, root / "results")
        assert finetune.main(ARGS + [
            "--run-name", "dec", "--tasks", "index_to_pref", "history_to_index", "--task-ratio", "1", "1",
            "--prompt-format", "alpaca", "--max-steps", "2", "--eval-every", "2", "--batch-size", "2",
            "--eval-users", "4", "--warmup-steps", "0"]) == 0
        assert export.main(["--dataset", "gift-cards", "--run-name", "t", "--results-dir",
                            str(root / "results"), "--out", str(root / "b"), "--decode", "dec",
                            "--no-include-data"]) == 0
        yield load_bundle(root / "b")
    finally:
        mp.undo()


def test_live_candidates_equal_the_exported_lists(bundle):
    """For a table user's history up to the test item, the live top-20 is the exported list."""
    live = bundle.live_retriever()
    test = bundle.candidates[bundle.candidates["split"] == "test"].set_index("user")
    users = bundle.users.set_index("user")
    for u in test.index[:25]:
        items, scores = live.top(list(users.at[u, "history"]), 20)
        assert items == [int(i) for i in test.at[u, "candidates"]]
        assert np.allclose(scores, test.at[u, "scores"], atol=1e-5)


def test_indexer_reproduces_the_table_for_a_table_user(bundle):
    """With a table user's own ID embedding and training reviews, the indexer gives that
    user's codes (the last level may differ where collision resolution moved the user)."""
    from ulmrec.data import load_dataset
    from ulmrec.indexing.encoder import embed
    from ulmrec.indexing.reviews import build_review_sets
    ds = load_dataset("gift-cards")
    sets = build_review_sets(ds)
    indexer = bundle.indexer()
    table = bundle.users.set_index("user")
    for row in range(5):
        user = int(sets.users[row])
        query = torch.from_numpy(embed(indexer.encoder(), [sets.reviewer_ids[row]])[0])
        codes = indexer.codes(sets.user_texts(row), query=query)
        want = parse_token_string(table.at[user, "index"])
        assert codes[:-1] == want[:-1]


def test_recommend_serves_a_new_history_and_writes_nothing(bundle):
    before = {p: sha256_file(p) for p in bundle.root.rglob("*") if p.is_file()}
    titles = bundle.items.sort_values("item")["title"].tolist()
    history = [3, titles[9], bundle.items["asin"].iloc[20]]
    rec = bundle.recommend(history, text="Loves <b>coffee</b> shops")
    assert rec.history == [3, 10, int(bundle.items["item"].iloc[20])]
    assert len(rec.candidates) == 20 and not set(rec.candidates["item"]) & set(rec.history)
    assert rec.candidates["prob"].sum() == pytest.approx(1.0, abs=1e-4)
    assert len(parse_token_string(rec.index)) == 3 and "your text" in rec.index_source
    counts = rec.shared["users sharing it"].tolist()
    assert counts == sorted(counts, reverse=True) and counts[0] <= len(bundle.users)
    assert len(parse_token_string(rec.predicted_index)) == 3 and 0 <= rec.agreement <= 1
    assert rec.ladder["prefix"].tolist() == rec.shared["prefix"].tolist()
    assert rec.ladder["generated preference"].map(len).min() > 0
    payload = json.loads(json.dumps(rec.to_dict()))
    assert payload["candidates"][0]["letter"] == "A" and payload["index"] == rec.index
    # the same input gives the same answer; no file of the bundle changed
    again = bundle.recommend(history, text="Loves <b>coffee</b> shops")
    assert again.to_dict() == rec.to_dict()
    assert before == {p: sha256_file(p) for p in bundle.root.rglob("*") if p.is_file()}


def test_predicted_index_on_the_kv_cache_equals_rereading_the_prompt(bundle):
    """predict_index feeds each chosen level token on top of the prompt's cache: the codes
    must be those of running the whole prompt again at every level."""
    model, tok, fmt = bundle.decoder()
    titles = bundle.titles()
    codebook = [[tok.convert_tokens_to_ids(f"<{level_letter(lv)}_{c}>") for c in range(64)]
                for lv in range(3)]
    for hist in bundle.users["history"].iloc[:3]:
        names = [titles[int(i)] for i in list(hist)[-3:]]
        got = predict_index(model, tok, fmt, names, 3, 64, 256)
        ex = Example("history_to_index", NEW_USER, INSTRUCTIONS["history_to_index"][0],
                     history_line(names), "")
        ids, want = encode(tok, ex, fmt, 256, with_response=False)["input_ids"], []
        with torch.no_grad():
            for vocab in codebook:
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                want.append(int(torch.argmax(logits[torch.tensor(vocab)])))
                ids = ids + [vocab[want[-1]]]
        assert got == want


def test_bad_histories_and_texts_say_what_is_wrong(bundle):
    items = bundle.items
    title = items["title"].iloc[5]
    with pytest.raises(InputError, match="empty"):
        bundle.recommend([])
    with pytest.raises(InputError, match="empty"):
        bundle.recommend(["  ", ""])
    with pytest.raises(InputError, match=r"1 of the 2 .*did you mean"):
        bundle.recommend([3, title[:-1] + "x"])
    with pytest.raises(InputError, match="not in the catalogue"):
        bundle.recommend(["no such item at all 123"])
    with pytest.raises(InputError, match="characters; the limit"):
        bundle.recommend([3], text="x" * (MAX_TEXT + 1))
    ids, notes = resolve_history(items, [3, 4, 3])
    assert ids == [4, 3] and "repeated" in notes[0]
    many = items["item"].astype(int).tolist()[: MAX_ITEMS + 5]
    ids, notes = resolve_history(items, many)
    assert ids == many[-MAX_ITEMS:] and "most recent" in notes[0]


def test_a_bundle_without_the_retriever_says_so(bundle, tmp_path):
    import shutil
    old = tmp_path / "old"
    shutil.copytree(bundle.root, old)
    manifest = json.loads((old / "bundle.json").read_text())
    manifest.pop("live")
    (old / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no retriever"):
        load_bundle(old, check_hashes=False).recommend([3])


def test_recommend_endpoint_tab_and_mcp_tool(bundle):
    """/recommend answers what Bundle.recommend answers; the tab's handler escapes the input;
    with --mcp the same function is a typed, described MCP tool."""
    import urllib.request

    from gradio_client import Client

    from test_app import free_port
    from ulmrec.app import newuser
    from ulmrec.app.logic import prepare
    from ulmrec.app.serving import serve
    from ulmrec.app.ui import build_demo
    data = prepare(bundle)
    title = bundle.items["title"].iloc[4]
    status, summary, shared, cands, ladder = newuser.on_recommend(
        data, f"3\n{title}", "<script>alert(1)</script> I like <b>gifts</b>")
    assert status == "" and "<script>" not in summary and len(cands) == 20
    status, *_ = newuser.on_recommend(data, "", "")
    assert "empty" in status
    assert newuser.search_titles(data, title.split()[0])[0] and newuser.add_item("3", title) == f"3\n{title}"
    demo = build_demo(data)
    port = free_port()
    serve(demo, "127.0.0.1", port, block=False, mcp=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        got = client.predict(["3", title], "likes gifts", api_name="/recommend")
        assert got == json.loads(json.dumps(bundle.recommend(["3", title], "likes gifts").to_dict()))
        api = client.view_api(return_format="dict", print_info=False)
        assert "/recommend" in api["named_endpoints"]
        # docs/app.md's example, as written, against this server
        doc = (Path(__file__).parent.parent / "docs" / "app.md").read_text()
        snippet = next(b for b in doc.split("```python")[1:] if "/recommend" in b).split("```")[0]
        scope: dict = {}
        exec(snippet.replace("http://127.0.0.1:7860/", f"http://127.0.0.1:{port}/"), scope)
        assert len(scope["rec"]["candidates"]) == 20 and scope["rec"]["index"]
        with pytest.raises(Exception, match="not in the catalogue"):
            client.predict(["no such thing 999"], "", api_name="/recommend")
        schema = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/gradio_api/mcp/schema", timeout=30).read())
        tool = next(t for t in schema if t["name"].endswith("recommend"))
        props = tool["inputSchema"]["properties"]
        assert set(props) >= {"history", "text"} and "most recent last" in props["history"]["description"]
        assert "new user" in tool["description"]
    finally:
        demo.close()
