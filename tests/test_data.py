import gzip
import json
import shutil

import pandas as pd
import pytest

from ulmrec.data import DataConfig, DataError, k_core, load_dataset, read_meta
from ulmrec.data.dataset import SOURCES


def _gift_files(shared_data):
    folder = shared_data / SOURCES["gift-cards"][1]
    return folder / "Gift_Cards_5.json.gz", folder / "meta_Gift_Cards.json.gz"


def _lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return fh.read().splitlines()


def test_gift_cards_matches_source_counts(gift_cards):
    # SOURCE.md: 7 duplicate (user, item) rows; earliest kept + iterative 5-core → 2,941/453/147
    s = gift_cards.stats()
    assert (s["users"], s["items"], s["interactions"]) == (453, 147, 2941)
    assert gift_cards.info["counts"]["duplicate_user_item"] == 7


def test_five_core_holds_and_ids_are_dense_sorted(gift_cards):
    inter = gift_cards.interactions
    assert inter.groupby("user").size().min() >= 5
    assert inter.groupby("item").size().min() >= 5
    assert gift_cards.users["user"].tolist() == list(range(1, 454))
    assert gift_cards.users["reviewerID"].tolist() == sorted(gift_cards.users["reviewerID"])
    assert gift_cards.items["asin"].tolist() == sorted(gift_cards.items["asin"])
    assert set(inter["item"]) <= set(gift_cards.items["item"])


def test_leave_one_out_is_chronological(gift_cards):
    inter = gift_cards.interactions
    per_user = inter.groupby("user")["split"].value_counts().unstack(fill_value=0)
    assert (per_user["test"] == 1).all() and (per_user["val"] == 1).all()
    for _, g in inter.groupby("user"):
        g = g.sort_values("position")
        assert g["timestamp"].is_monotonic_increasing
        assert g["split"].tolist()[-2:] == ["val", "test"]
    seqs = gift_cards.sequences("train")
    val, test = gift_cards.targets("val"), gift_cards.targets("test")
    full = gift_cards.sequences("test")
    u = int(seqs.index[0])
    assert full[u] == seqs[u] + [val[u], test[u]]


def test_interactions_keep_rating_and_review_text(gift_cards):
    inter = gift_cards.interactions
    assert inter["rating"].between(1, 5).all()
    assert (inter["text_kind"] == "review").all()
    assert (inter["text"].str.len() > 0).mean() > 0.99
    assert inter["text"].str.contains("gift", case=False).any()


def test_titles_unescaped(gift_cards):
    titles = gift_cards.items["title"]
    assert not titles.str.contains("&amp;|&#39;|&quot;|<", regex=True).any()
    assert (gift_cards.items["title_source"] == "title").all()


def test_malformed_lines_reported_with_line_number_and_skipped(shared_data, tmp_path):
    reviews, meta = _gift_files(shared_data)
    lines = _lines(reviews)
    lines[9] = lines[9][: len(lines[9]) // 2]              # line 10: truncated JSON
    rec = json.loads(lines[19])
    del rec["asin"]
    lines[19] = json.dumps(rec)                             # line 20: missing field
    bad = tmp_path / "Gift_Cards_5.json"                    # plain text this time, not gzip
    bad.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(reviews=str(bad), meta=str(meta), use_cache=False)
    ds = load_dataset(cfg)
    rep = ds.info["lines"]["reviews"]
    assert rep["malformed"] == 2 and rep["kept"] == len(lines) - 2
    assert rep["first_issues"][0].startswith(f"{bad}:10: ")
    assert rep["first_issues"][1].startswith(f"{bad}:20: ") and "asin" in rep["first_issues"][1]

    with pytest.raises(DataError, match=r"Gift_Cards_5\.json:10: "):
        load_dataset(DataConfig(reviews=str(bad), meta=str(meta), strict=True, use_cache=False))


def test_2014_layout_with_python_literal_meta(shared_data, tmp_path, gift_cards):
    # The 2014 release writes meta as Python dict literals; rebuild that shape from real rows.
    reviews, meta = _gift_files(shared_data)
    folder = tmp_path / "gift2014"
    folder.mkdir()
    shutil.copy(reviews, folder / "reviews_Gift_Cards_5.json.gz")
    with gzip.open(folder / "meta_Gift_Cards.json.gz", "wt", encoding="utf-8") as out:
        for line in _lines(meta):
            rec = json.loads(line)
            rec["categories"] = [rec.pop("category", [])]
            out.write(repr(rec) + "\n")
    ds = load_dataset(DataConfig(dataset=str(folder), use_cache=False))
    assert ds.stats() == {**gift_cards.stats(), "dataset": "gift2014"}
    assert ds.info["lines"]["meta"]["malformed"] == 0


def test_meta_never_evaluates_code(tmp_path):
    path = tmp_path / "meta_X.json"
    path.write_text("{'asin': 'A1', 'title': 'ok'}\n__import__('os').system('echo hacked')\n")
    meta, report = read_meta(path)
    assert meta["asin"].tolist() == ["A1"]
    assert len(report.issues) == 1 and report.issues[0].line == 2


def test_missing_file_and_no_users_left_are_clear_errors(shared_data, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(DataConfig(reviews=str(tmp_path / "nope_5.json.gz"), use_cache=False))
    with pytest.raises(DataError, match="no users left"):
        load_dataset(DataConfig(dataset="all-beauty", use_cache=False))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(DataConfig(dataset="no-such-set", use_cache=False))


def test_magazine_title_fallback_is_counted(shared_data):
    ds = load_dataset(DataConfig(dataset="magazine", use_cache=False))
    n = ds.info["counts"]["title_fallbacks"]
    assert n == (ds.items["title_source"] == "fallback").sum() and n > 100
    assert not ds.items["title"].str.contains("<span", regex=False).any()
    # Only 3 reviewed magazines have a real title: without the fallback nothing survives 5-core.
    with pytest.raises(DataError, match="reviewed_items_with_title=3"):
        load_dataset(DataConfig(dataset="magazine", title_fallback=False, use_cache=False))


def test_cache_roundtrip_and_invalidation(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "cache"))
    first = load_dataset("gift-cards")
    again = load_dataset("gift-cards")
    assert "from_cache" in again.info and "from_cache" not in first.info
    pd.testing.assert_frame_equal(first.interactions, again.interactions)
    other = load_dataset(DataConfig(dataset="gift-cards", min_core=3))
    assert other.info["fingerprint"] != first.info["fingerprint"]
    assert not list((tmp_path / "cache" / "data").glob("*.*.*"))  # no temp folders left


def test_release_split_loads_authors_users_and_targets(shared_data):
    ds = load_dataset("games")
    s = ds.stats()
    assert (s["users"], s["items"], s["interactions"]) == (15264, 7676, 147861)
    assert (ds.interactions["text_kind"] == "title_proxy").all()
    assert ds.interactions["rating"].isna().all()
    with gzip.open(shared_data / "ulmrec-release/games/sequences.jsonl.gz", "rt") as fh:
        first = json.loads(fh.readline())
    u = first["user"]
    assert ds.sequences("train")[u] == first["train"]
    assert ds.targets("test")[u] == first["test"][0]
    assert ds.users.set_index("user").loc[u, "release_index"].startswith("<a_")
    assert ds.users["preference"].notna().mean() > 0.99


def test_k_core_is_iterative():
    # w has 1 interaction -> u2 goes -> x drops to 1 -> u1 goes -> y drops to 1 -> u3 goes
    pairs = [("u1", "x"), ("u1", "y"), ("u2", "x"), ("u2", "w"), ("u3", "y"), ("u3", "z"),
             ("u4", "z"), ("u4", "v"), ("u5", "v"), ("u5", "z")]
    df = pd.DataFrame(pairs, columns=["reviewerID", "asin"])
    kept = k_core(df, 2)
    assert sorted(map(tuple, kept.values.tolist())) == [("u4", "v"), ("u4", "z"), ("u5", "v"),
                                                        ("u5", "z")]


def test_cli_prints_table1(capsys, shared_data):
    from train.data import main
    assert main(["--dataset", "gift-cards"]) == 0
    out = capsys.readouterr().out
    assert "# Users" in out and "gift-cards" in out and "2,941" in out
    assert main(["--dataset", "all-beauty", "--no-use-cache"]) == 2  # bad input: usage-type exit


# ---------------------------------------------------------------- bad input never passes as good data
# Small synthetic dumps: 8 users who all review the same 6 items (a 5-core that survives),
# with enough random words per review that a cut .gz still holds whole lines.

def _review_lines(n_users=8, n_items=6, seed=0):
    import random
    rng = random.Random(seed)
    words = "great card gift easy fast balance store online perfect birthday value".split()
    # "verified": true, as in the 2018 dumps, makes a line that is not JSON no Python literal either
    return [json.dumps({"reviewerID": f"U{u:02d}", "asin": f"B{i:02d}", "overall": 5.0, "verified": True,
                        "unixReviewTime": 1_500_000_000 + 1000 * u + i,
                        "summary": "ok", "reviewText": " ".join(rng.choices(words, k=60))})
            for u in range(n_users) for i in range(n_items)]


def _meta_lines(n_items=6, title=True):
    return [json.dumps({"asin": f"B{i:02d}", **({"title": f"Card {i}"} if title else {})})
            for i in range(n_items)]


def _write(path, lines, gz=True):
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _dump(tmp_path, reviews=None, meta=None, gz=True):
    """(reviews file, meta file) in tmp_path/dump, the files named as the 2018 release names them."""
    folder = tmp_path / "dump"
    folder.mkdir(exist_ok=True)
    ext = ".json.gz" if gz else ".json"
    r = _write(folder / f"Toy_5{ext}", _review_lines() if reviews is None else reviews, gz)
    m = _write(folder / f"meta_Toy{ext}", _meta_lines() if meta is None else meta, gz)
    return r, m


def _cut(path, fraction=0.6):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULMREC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


def test_synthetic_dump_loads(tmp_path, cache):
    r, m = _dump(tmp_path)
    s = load_dataset(DataConfig(reviews=str(r), meta=str(m))).stats()
    assert (s["users"], s["items"], s["interactions"]) == (8, 6, 48)


def test_truncated_reviews_are_an_error_unless_allowed_and_then_loud(tmp_path, cache, capsys):
    from train.data import main
    r, m = _dump(tmp_path)
    _cut(r)
    with pytest.raises(DataError, match=rf"{r}: truncated or corrupt gzip archive .* after line \d+"
                                        r".*--allow-truncated"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))
    assert main(["--reviews", str(r), "--meta", str(m)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(r) in err

    ds = load_dataset(DataConfig(reviews=str(r), meta=str(m), allow_truncated=True, min_core=2))
    rep = ds.info["lines"]["reviews"]
    assert rep["truncated"].startswith(f"{r}: truncated") and 0 < rep["kept"] < 48
    # accepted for these bytes: later stages (default flags) get the prefix too, never quietly,
    # and never under --strict
    with pytest.raises(DataError, match=r"truncated.*--strict"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m), min_core=2, strict=True))
    with pytest.raises(DataError, match=r"truncated.*--strict"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m), min_core=2, allow_truncated=True,
                                strict=True))
    again = load_dataset(DataConfig(reviews=str(r), meta=str(m), min_core=2))
    assert "from_cache" in again.info and again.info["lines"]["reviews"]["truncated"]
    assert main(["--reviews", str(r), "--meta", str(m), "--min-core", "2"]) == 0
    assert "TRUNCATED" in capsys.readouterr().out


def test_truncated_or_corrupt_meta_is_an_error(tmp_path, cache):
    r, m = _dump(tmp_path, meta=_meta_lines() * 40)  # long enough to cut after a few lines
    _cut(m, 0.5)
    with pytest.raises(DataError, match=rf"{m}: truncated or corrupt gzip"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))
    data = bytearray(gzip.compress(("\n".join(_meta_lines() * 40) + "\n").encode()))
    data[len(data) // 2: len(data) // 2 + 8] = b"\0" * 8              # damaged, not shorter
    m.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{m}: truncated or corrupt gzip"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m), use_cache=False))


def test_strict_fails_on_a_cache_a_lenient_run_wrote(tmp_path, cache):
    lines = _review_lines()
    lines.insert(3, "{not json")
    r, m = _dump(tmp_path, reviews=lines)
    first = load_dataset(DataConfig(reviews=str(r), meta=str(m)))
    assert first.info["lines"]["reviews"]["malformed"] == 1
    with pytest.raises(DataError, match=rf"{r}:4: .*--strict"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m), strict=True))


def test_malformed_line_says_line_column_and_shows_an_excerpt(tmp_path, cache):
    lines = _review_lines()
    lines[4] = lines[4].replace('"summary": "ok"', '"summary": "o\x01k"')   # raw control char
    r, m = _dump(tmp_path, reviews=lines)
    rep = load_dataset(DataConfig(reviews=str(r), meta=str(m))).info["lines"]["reviews"]
    issue = rep["first_issues"][0]
    col = lines[4].index("\x01") + 1
    assert issue.startswith(f"{r}:5: ")
    assert f"Invalid control character at column {col}" in issue
    assert 'near "…' in issue and "\\u0001k" in issue


def test_empty_files_are_errors(tmp_path, cache):
    r, m = _dump(tmp_path, reviews=[])
    with pytest.raises(DataError, match=rf"{r}: empty file"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))
    r, m = _dump(tmp_path, meta=[], gz=False)
    with pytest.raises(DataError, match=rf"{m}: empty file"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))


def test_a_file_of_only_malformed_lines_is_an_error(tmp_path, cache):
    r, m = _dump(tmp_path, reviews=["{oops", "[1, 2]", '{"asin": "B01"}'])
    with pytest.raises(DataError, match=rf"{r}: none of its 3 lines is a usable record \(first: {r}:1: "):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))


def test_meta_without_titles_names_the_meta_file(tmp_path, cache):
    r, m = _dump(tmp_path, meta=_meta_lines(title=False))
    with pytest.raises(DataError, match=rf"{m}: none of its 6 items has a usable title"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))
    r, m = _dump(tmp_path, meta=[json.dumps({"asin": "X1", "title": "Other"})])
    with pytest.raises(DataError, match=rf"{m}: none of the 6 items reviewed in {r} is in it"):
        load_dataset(DataConfig(reviews=str(r), meta=str(m)))


def test_non_utf8_bytes_skip_that_line_only(tmp_path, cache):
    r, m = _dump(tmp_path)
    lines = gzip.decompress(r.read_bytes()).split(b"\n")
    lines[2] = lines[2].replace(b'"ok"', b'"o\xffk"')                     # Latin-1 byte
    r.write_bytes(gzip.compress(b"\n".join(lines)))
    ds = load_dataset(DataConfig(reviews=str(r), meta=str(m), min_core=2))
    rep = ds.info["lines"]["reviews"]
    assert (rep["read"], rep["kept"], rep["malformed"]) == (48, 47, 1)    # the rest is still read
    assert rep["first_issues"][0].startswith(f"{r}:3: not UTF-8: byte 0xff")


def test_dataset_folder_with_one_of_its_two_files(tmp_path, cache):
    r, m = _dump(tmp_path)
    m.unlink()
    with pytest.raises(DataError, match=r"no meta file"):
        load_dataset(DataConfig(dataset=str(r.parent)))
    for present in ("items.jsonl.gz", "sequences.jsonl.gz"):
        rel = tmp_path / f"rel-{present}"
        rel.mkdir()
        _write(rel / present, ['{"item": 1}'])
        with pytest.raises(DataError, match=r"not found \(a release split folder has"):
            load_dataset(DataConfig(dataset=str(rel)))


def _release(folder, val=(7,), n_users=6):
    folder.mkdir()
    _write(folder / "items.jsonl.gz", [json.dumps({"item": i, "asin": f"A{i}", "title": f"T {i}"})
                                       for i in range(1, 31)])
    _write(folder / "sequences.jsonl.gz", [
        json.dumps({"user": u, "reviewerID": f"R{u}", "train": [1 + u, 2 + u, 3 + u, 4 + u],
                    "val": list(val) if u == 3 else [20], "test": [21 + u]})
        for u in range(1, n_users + 1)])
    return folder


def test_release_val_list_longer_than_one_item_is_an_error(tmp_path, cache):
    ok = load_dataset(DataConfig(dataset=str(_release(tmp_path / "ok"))))
    assert ok.targets("val")[3] == 7
    bad = _release(tmp_path / "bad", val=(7, 8))
    with pytest.raises(DataError, match=r"sequences\.jsonl\.gz:3: user 3 \(R3\): 'val' holds 2 items"):
        load_dataset(DataConfig(dataset=str(bad)))


def test_ctrl_c_while_writing_the_cache_leaves_nothing_to_read_back(tmp_path, cache, monkeypatch):
    r, m = _dump(tmp_path)
    cfg = DataConfig(reviews=str(r), meta=str(m))
    real = pd.DataFrame.to_parquet
    calls = []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_parquet", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(cfg)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert not cache.exists() or not list(cache.iterdir())               # no folder, no temp
    assert "from_cache" not in load_dataset(cfg).info
    # a folder left incomplete some other way (a killed older writer, a hand-deleted table)
    # is rebuilt, never read back
    (folder,) = cache.iterdir()
    (folder / "interactions.parquet").unlink()
    ds = load_dataset(cfg)
    assert "from_cache" not in ds.info and len(ds.interactions) == 48
    assert "from_cache" in load_dataset(cfg).info


def test_concurrent_runs_writing_the_same_cache(tmp_path, cache):
    import threading

    from ulmrec.data.dataset import _write_cache
    r, m = _dump(tmp_path)
    ds = load_dataset(DataConfig(reviews=str(r), meta=str(m), use_cache=False))
    target = cache / "toy-0000"
    errors, start = [], threading.Barrier(4)

    def writer():
        start.wait()
        try:
            for _ in range(15):
                _write_cache(ds, target)
        except Exception as e:  # noqa: BLE001 (the test reports whatever a writer hit)
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [p.name for p in cache.iterdir()] == ["toy-0000"]             # no temp folder left
    assert len(pd.read_parquet(target / "interactions.parquet")) == 48
