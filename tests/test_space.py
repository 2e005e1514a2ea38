"""The app on a Hugging Face Space (SPACE_ID set): Hub defaults, a setup page when nothing is
configured or the Hub refuses, ZeroGPU decoration only where `spaces` exists."""
import sys
import types

import httpx
import pytest
from test_push import closed_port_url, hf_home, point_hf_at  # noqa: F401  (fixtures)

from ulmrec.app import cli, space


def _serve_and_read(monkeypatch, argv=()):
    """Start the app as a Space would (cli.main's hook), non-blocking; its config JSON."""
    monkeypatch.setenv("SPACE_ID", "tester/ulmrec")
    args = cli.parse_args(["--host", "127.0.0.1", "--port", "0", *argv])
    args.port = None
    demo = space.main(args, block=False)
    try:
        url = demo.local_url.rstrip("/")
        page = httpx.get(f"{url}/config", timeout=30).text
    finally:
        demo.close()
    return page


def test_nothing_configured_serves_the_setup_page(monkeypatch, tmp_path):
    monkeypatch.delenv("ULMREC_BUNDLE", raising=False)
    monkeypatch.setattr(space, "REPO_ROOT", tmp_path)          # a README with no `models:`
    (tmp_path / "README.md").write_text("---\ntitle: ULMRec\nsdk: gradio\n---\n# ULMRec\n")
    page = _serve_and_read(monkeypatch)
    assert "No bundle is configured" in page and "ULMREC_BUNDLE" in page and "models:" in page
    assert "Traceback" not in page


def test_a_hub_error_is_shown_on_the_setup_page(hf_home, monkeypatch):  # noqa: F811
    endpoint = closed_port_url()
    point_hf_at(monkeypatch, endpoint)
    monkeypatch.setenv("ULMREC_BUNDLE", "tester/ulmrec-missing")
    page = _serve_and_read(monkeypatch)
    assert "could not be opened" in page and "tester/ulmrec-missing" in page
    assert f"cannot reach {endpoint}" in page and "Traceback" not in page


def test_the_bundle_comes_from_the_variable_then_the_front_matter(monkeypatch, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("---\ntitle: ULMRec\nmodels:\n- not a repo\n- tester/ulmrec-games\n---\n")
    monkeypatch.delenv("ULMREC_BUNDLE", raising=False)
    assert space.configured_bundle(readme) == "tester/ulmrec-games"
    monkeypatch.setenv("ULMREC_BUNDLE", "tester/other")
    assert space.configured_bundle(readme) == "tester/other"
    monkeypatch.delenv("ULMREC_BUNDLE")
    readme.write_text("# no front matter\n")
    assert space.configured_bundle(readme) is None


def test_on_a_space_the_hub_is_online_unless_said_otherwise(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    space.configure_environment()
    from ulmrec.paths import is_offline
    assert not is_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    space.configure_environment()
    assert is_offline()


def test_gpu_is_a_no_op_without_spaces_and_spaces_gpu_with_it(monkeypatch):
    from ulmrec.bundle import Bundle

    def f(x):
        return x + 1
    monkeypatch.setitem(sys.modules, "spaces", None)           # not installed
    assert space.gpu(f) is f and space.gpu(duration=10)(f) is f
    assert space.enable_zero_gpu() is False

    calls = []

    limits = {}

    def GPU(fn=None, **kwargs):                                # the ZeroGPU decorator's shape
        def wrap(g):
            limits[g.__name__] = kwargs.get("duration")
            def inner(*a, **k):
                calls.append(g.__name__)
                return g(*a, **k)
            return inner
        return wrap(fn) if fn is not None else wrap
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    assert space.gpu(f)(1) == 2 and calls == ["f"]
    for name in space.GPU_METHODS:                             # restored after the test
        monkeypatch.setattr(Bundle, name, getattr(Bundle, name))
    assert space.enable_zero_gpu() is True
    space.enable_zero_gpu()                                    # wraps once, not twice
    wrapped = [getattr(Bundle, n) for n in space.GPU_METHODS]
    assert all(getattr(w, "_ulmrec_gpu", False) for w in wrapped)
    # each call asks ZeroGPU for a stated time, not the 60 s default for everything
    assert {n: limits[n] for n in space.GPU_METHODS} == space.GPU_METHODS
    assert all(0 < d <= 120 for d in space.GPU_METHODS.values())
    with pytest.raises(Exception):
        Bundle.rank(None, [1])                                 # goes through the wrapper
    assert calls[-1] == "rank"


# Names that Python 3.11+ added and a 3.10 Space would fail on at import or first use
NEWER_THAN_310 = ("from datetime import UTC", "datetime.UTC", "import tomllib", "StrEnum",
                  "typing.Self", "from typing import Self", "ExceptionGroup", "except*",
                  "asyncio.TaskGroup", "LiteralString")


def test_the_code_runs_on_the_python_the_space_metadata_names():
    """The Space's python_version (ZeroGPU's documented one) compiles every module that the app
    and the pipeline import, and none of them uses a 3.11-only name."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    meta = space.front_matter(root / "README.md")
    assert meta["sdk"] == "gradio" and meta["suggested_hardware"] == "zero-a10g"
    major, minor = (int(x) for x in str(meta["python_version"]).split(".")[:2])
    assert (major, minor) == (3, 10)
    files = [root / "app.py", *(root / "ulmrec").rglob("*.py"), *(root / "train").rglob("*.py")]
    assert len(files) > 60
    for path in files:
        text = path.read_text()
        ast.parse(text, filename=str(path), feature_version=(major, minor))
        used = [n for n in NEWER_THAN_310 if n in text]
        assert not used, f"{path.relative_to(root)} uses {used} (Python 3.11+)"
