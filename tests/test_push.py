"""Push / download of bundles against a real HTTP fake of the Hub (tests/fake_hub.py).

The real huggingface_hub client talks to a server on 127.0.0.1, so routes, payloads, headers
and the error mapping are exercised end to end; nothing leaves the machine.
"""
from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pandas as pd
import pytest
from fake_hub import FakeHub
from huggingface_hub import constants

from train import push as push_cli
from ulmrec.bundle_format import (FORMAT, LCREC_DIR, LCREC_FILES, MANIFEST, REQUIRED_FILES, BundleError,
                                  read_manifest)
from ulmrec.paths import sha256_file
from ulmrec.hub import HubError, default_commit_message, download_bundle, push_bundle

TOKEN = "hf_fakeWriteToken0123456789abcdef"
REPO = "tester/ulmrec-gift-cards"
METRICS = {"dataset": "gift-cards", "results": {
    "retriever (lrurec)": {"rank": {"NDCG@10": 0.25}, "overall": {"NDCG@10": 0.05}},
    "backbone (untuned)": {"rank": {"NDCG@10": 0.20}, "overall": {"NDCG@10": 0.04}},
    "ulmrec": {"rank": {"NDCG@10": 0.3125}, "overall": {"NDCG@10": 0.1234}},
}}


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A private HF home, online, with no token anywhere but what a test sets.

    huggingface_hub copies HF_HOME, HF_HUB_OFFLINE etc. into `constants` at import (and
    tests/conftest.py sets HF_HUB_OFFLINE=1 for the suite), so the constants are patched too."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_ASSETS_CACHE": home / "assets",
                        "HF_TOKEN_PATH": home / "token", "HF_STORED_TOKENS_PATH": home / "stored_tokens",
                        "HF_XET_CACHE": home / "xet"}.items():
        monkeypatch.setattr(constants, name, str(value))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    # huggingface_hub fetches an "agent harnesses" registry from the endpoint once a day and
    # caches it under HF_HOME; a fresh empty cache keeps that side request out of these tests.
    harnesses = home / ".agent_harnesses.json"
    harnesses.parent.mkdir(parents=True)
    harnesses.write_text(json.dumps({"standardEnvVars": [], "harnesses": {}}))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(harnesses))
    return home


def point_hf_at(monkeypatch, endpoint: str) -> None:
    """HF_ENDPOINT=endpoint as if set before huggingface_hub was imported: the env var plus the
    constants it derives from it then (the endpoint, the resolve-URL template, the trusted hosts)."""
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})


@pytest.fixture
def hub(hf_home, monkeypatch):
    with FakeHub(TOKEN) as server:
        point_hf_at(monkeypatch, server.url)
        yield server


def write_bundle(folder: Path, run: str | None = "ulmrec", lcrec: bool = False) -> Path:
    """Every required file with small stand-in contents, and a manifest that hashes them."""
    folder.mkdir(parents=True)
    texts = {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8}),
        "tokenizer.json": json.dumps({"model": {"type": "BPE"}, "added_tokens": []}),
        "tokenizer_config.json": json.dumps({"model_max_length": 512}),
        "ulmrec_config.json": json.dumps({"index_kind": "rq", "num_candidates": 20}),
        "metrics.json": json.dumps(METRICS),
        "config.yaml": "dataset: gift-cards\nretriever: lrurec\n",
        "README.md": "---\nlibrary_name: peft\ntags: [recommendation]\n---\n# ULMRec on Gift Cards\n",
    }
    for name, text in texts.items():
        (folder / name).write_text(text)
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)  # binary, not UTF-8
    pd.DataFrame({"reviewerID": ["A1", "A2"], "index": ["<a_1><b_2>", "<a_3><b_4>"]}).to_parquet(
        folder / "user_index.parquet", index=False)
    pd.DataFrame({"reviewerID": ["A1", "A2"], "split": ["test", "test"],
                  "candidates": [["B01", "B02"], ["B02", "B03"]], "scores": [[0.9, 0.1], [0.8, 0.2]]}
                 ).to_parquet(folder / "candidates.parquet", index=False)
    files = {n: sha256_file(folder / n) for n in REQUIRED_FILES if n != MANIFEST}
    manifest = {"format": FORMAT, "dataset": {"name": "gift-cards"}, "includes_data": False, "files": files}
    if lcrec:  # the optional whole-catalogue part lives in a sub-folder
        (folder / LCREC_DIR).mkdir()
        for name in LCREC_FILES:
            (folder / LCREC_DIR / name).write_bytes(f"lcrec {name}".encode())
            files[f"{LCREC_DIR}/{name}"] = sha256_file(folder / LCREC_DIR / name)
        manifest["lcrec"] = {"items": 3, "tokenizer": "shared"}
    if run is not None:
        manifest["run"] = run
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle")


def closed_port_url() -> str:
    """An endpoint on which nothing listens: the port was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# -- push ----------------------------------------------------------------------------------


@pytest.mark.parametrize("xet", [True, False], ids=["xet-pipeline", "create-commit"])
def test_push_uploads_every_file_byte_identical_in_one_commit(hub, bundle, monkeypatch, caplog, xet):
    # huggingface_hub takes a different upload path with and without hf_xet: cover both.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # resolved by huggingface_hub, not by ulmrec
    caplog.set_level(logging.DEBUG)
    url = push_bundle(bundle, REPO, private=True)

    repo = hub.repos[REPO]
    assert repo.private is True
    assert len(repo.commits) == 1
    assert url == f"{hub.url}/{REPO}/commit/{repo.commits[0].sha}"
    assert hub.files(REPO) == folder_bytes(bundle)
    message = repo.commits[0].message
    assert message == "ULMRec bundle for gift-cards: Rank NDCG@10 0.3125, Overall NDCG@10 0.1234"
    assert [r for r in hub.requests if not r.authorised] == []
    assert TOKEN not in caplog.text


def test_push_public_by_default_and_custom_message(hub, bundle):
    push_bundle(bundle, REPO, commit_message="first export", token=TOKEN)
    push_bundle(bundle, REPO, commit_message="second export", token=TOKEN)  # repo exists: fine
    repo = hub.repos[REPO]
    assert repo.private is False
    assert [c.message for c in repo.commits] == ["first export", "second export"]


def test_wrong_token_is_refused_without_leaking_it(hub, bundle, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "hf_wrongToken_do_not_print_me_42"
    with pytest.raises(HubError) as err:
        push_bundle(bundle, REPO, token=wrong)
    message = str(err.value)
    assert "not authorised to write" in message and REPO in message and "HF_TOKEN" in message
    assert wrong not in message and wrong not in caplog.text
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained client error
    assert REPO not in hub.repos


def test_no_token_at_all_is_refused(hub, bundle):
    with pytest.raises(HubError, match="not authorised to write.*HF_TOKEN"):
        push_bundle(bundle, REPO)  # the repo does not exist yet: refused at creation
    assert hub.requests and not any(r.authorised for r in hub.requests)
    push_bundle(bundle, REPO, token=TOKEN)
    with pytest.raises(HubError, match="not authorised to write.*HF_TOKEN"):
        push_bundle(bundle, REPO)  # public repo exists: creation passes, the upload is refused
    assert len(hub.repos[REPO].commits) == 1


def test_bad_repo_id(hub, bundle):
    with pytest.raises(HubError, match="not a Hub repo id"):
        push_bundle(bundle, "tester/has spaces/and/slashes", token=TOKEN)


def test_offline_push_fails_before_any_request(hub, bundle, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline"):
        push_bundle(bundle, REPO, token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_broken_bundle_is_refused_before_any_request(hub, bundle, damage):
    target = bundle / "adapter_model.safetensors"
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="adapter_model.safetensors"):
        push_bundle(bundle, REPO, token=TOKEN)
    assert hub.requests == [] and hub.repos == {}


def test_unreachable_endpoint(hf_home, bundle, monkeypatch):
    endpoint = closed_port_url()
    point_hf_at(monkeypatch, endpoint)
    with pytest.raises(HubError, match=f"cannot reach {endpoint}"):
        push_bundle(bundle, REPO, token=TOKEN)
    with pytest.raises(HubError, match=f"cannot reach {endpoint}"):
        download_bundle(REPO)


# -- download ------------------------------------------------------------------------------


def test_download_round_trip_then_offline_from_cache(hub, bundle, hf_home, monkeypatch):
    push_bundle(bundle, REPO, token=TOKEN)
    folder = download_bundle(REPO, token=TOKEN)
    assert folder.is_relative_to(hf_home)
    assert folder_bytes(folder) == folder_bytes(bundle)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    assert download_bundle(REPO) == folder
    assert len(hub.requests) == before


def test_lcrec_part_travels_in_its_sub_folder(hub, tmp_path):
    bundle = write_bundle(tmp_path / "with-lcrec", lcrec=True)
    push_bundle(bundle, REPO, token=TOKEN)
    assert f"{LCREC_DIR}/item_index.parquet" in hub.files(REPO)
    folder = download_bundle(REPO, token=TOKEN)
    assert folder_bytes(folder) == folder_bytes(bundle)
    # a bundle that announces the part but lacks a file of it is refused by name
    (bundle / LCREC_DIR / "item_index.parquet").unlink()
    with pytest.raises(BundleError, match="lcrec/item_index.parquet"):
        push_bundle(bundle, REPO, token=TOKEN)


def test_download_at_a_revision(hub, bundle):
    first = push_bundle(bundle, REPO, token=TOKEN).rsplit("/", 1)[1]
    # Someone edits a file on the Hub: the head no longer matches its manifest's hashes.
    hub.commit(hub.repos[REPO], "edit on the Hub", {"config.yaml": b"dataset: gift-cards\nretriever: sasrec\n"})
    with pytest.raises(BundleError, match=f"{REPO}.*config.yaml"):
        download_bundle(REPO, token=TOKEN)
    old = download_bundle(REPO, revision=first, token=TOKEN)
    assert folder_bytes(old) == folder_bytes(bundle)


def test_download_errors(hub, bundle, monkeypatch):
    with pytest.raises(HubError, match="repository not found"):
        download_bundle("tester/nothing-here")
    push_bundle(bundle, REPO, private=True, token=TOKEN)
    with pytest.raises(HubError, match="repository not found.*HF_TOKEN"):
        download_bundle(REPO)  # private and no token
    with pytest.raises(HubError, match="not authorised to read.*HF_TOKEN"):
        download_bundle(REPO, token="hf_wrong_read_token")
    with pytest.raises(HubError, match="no revision"):
        download_bundle(REPO, revision="v9", token=TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="not in the local HF cache.*offline"):
        download_bundle(REPO)


# -- commit message and CLI ----------------------------------------------------------------


def test_default_commit_message_picks_the_run_or_first_trained_system(tmp_path):
    folder = write_bundle(tmp_path / "b")
    manifest = read_manifest(folder)
    assert "Rank NDCG@10 0.3125" in default_commit_message(folder, manifest)
    manifest.run = None
    assert "Rank NDCG@10 0.3125" in default_commit_message(folder, manifest)  # baselines skipped
    (folder / "metrics.json").write_text("{not json")
    assert default_commit_message(folder, manifest) == "ULMRec bundle for gift-cards"


def test_cli_pushes_and_prints_the_commit_url(hub, bundle, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_cli.main(["--bundle", str(bundle), "--repo-id", REPO, "--private"]) == 0
    assert capsys.readouterr().out.strip() == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].commits[0].sha}"
    assert hub.repos[REPO].private

    (bundle / "README.md").unlink()
    assert push_cli.main(["--bundle", str(bundle), "--repo-id", REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "README.md" in err and "\n" not in err


# -- what the Hub would refuse or what would leak ------------------------------------------


def test_a_bundle_naming_a_machine_path_is_refused_before_any_request(hub, bundle):
    from ulmrec.paths import REPO_ROOT
    metrics = json.loads((bundle / "metrics.json").read_text())
    metrics["command"] = f"python -m train.evaluate --config {REPO_ROOT}/runs/gift-cards/evaluate.yaml"
    (bundle / "metrics.json").write_text(json.dumps(metrics))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["metrics.json"] = sha256_file(bundle / "metrics.json")
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="metrics.json.*path of this machine"):
        push_bundle(bundle, REPO, token=TOKEN)
    assert hub.requests == []


@pytest.mark.parametrize("front", ["base_model: /srv/models/smollm2\n",
                                   "tags: [unclosed\n", "pipeline_tag: not-a-task\n",
                                   "datasets:\n- amazon reviews 2018\n"])
def test_the_fake_hub_refuses_invalid_card_metadata_like_the_hub(hub, bundle, front):
    card = f"---\nlibrary_name: peft\n{front}---\n# card\n"
    (bundle / "README.md").write_text(card)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["README.md"] = sha256_file(bundle / "README.md")
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(HubError, match="refused the model card.*Invalid metadata in README.md"):
        push_bundle(bundle, REPO, token=TOKEN)
    assert hub.repos[REPO].commits == []


def test_validate_yaml_route_checks_the_card(hub):
    import httpx
    ok = httpx.post(f"{hub.url}/api/validate-yaml", json={"content": "---\nlicense: apache-2.0\n---\n"})
    assert ok.status_code == 200 and ok.json()["errors"] == []
    bad = httpx.post(f"{hub.url}/api/validate-yaml", json={"content": "---\nbase_model: /abs/path\n---\n"})
    assert bad.status_code == 400 and "base_model" in bad.json()["error"]


def test_the_manifest_round_trips_and_names_what_is_wrong(tmp_path):
    folder = write_bundle(tmp_path / "b", lcrec=True)
    manifest = read_manifest(folder)
    assert manifest.name == "gift-cards" and manifest.lcrec["items"] == 3 and manifest.decode is None
    assert read_manifest(folder).to_dict() == manifest.to_dict()
    assert "decode" not in manifest.to_dict()                     # absent parts stay absent
    raw = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**raw, "a_newer_part": {"x": 1}}))
    assert read_manifest(folder) == manifest                      # a newer writer's key is skipped
    (folder / MANIFEST).write_text(json.dumps({k: v for k, v in raw.items() if k != "dataset"}))
    with pytest.raises(BundleError, match="bundle.json: 'dataset' missing"):
        read_manifest(folder)
    (folder / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match="expected a mapping"):
        read_manifest(folder)
