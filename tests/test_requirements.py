"""requirements.txt covers what the app imports: every third-party module imported by app.py
and the ulmrec package (lazy imports inside functions included) belongs to a distribution that
requirements.txt names, or that one of those requires unconditionally; imports guarded by
`except ImportError` are optional. This machine's installed versions fall in the ranges.
(The slow, networked check — a fresh venv from requirements.txt alone importing every module —
is bench/check_requirements.py.)"""
import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def requirements(path=ROOT / "requirements.txt") -> dict[str, Requirement]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonical(req.name)] = req
    return reqs


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _guarded(tree: ast.AST) -> set[int]:
    """ids of import nodes inside a `try:` whose handlers catch ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if any("ImportError" in n or "ModuleNotFoundError" in n for n in names):
                guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return guarded


def app_imports() -> tuple[dict[str, set[str]], set[str]]:
    """({top-level module: files}, optional modules) over app.py and ulmrec/."""
    required, optional = {}, set()
    for path in [ROOT / "app.py", *sorted((ROOT / "ulmrec").rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        guarded = _guarded(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "ulmrec":
                    continue
                if id(node) in guarded:
                    optional.add(top)
                else:
                    required.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return required, optional


def closure(names: set[str]) -> set[str]:
    """The distributions `names` pull in unconditionally (no extras, markers that hold here)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen


def test_every_app_import_is_covered_by_requirements_txt():
    reqs = requirements()
    covered = closure(set(reqs))
    dists = md.packages_distributions()
    required, optional = app_imports()
    assert "spaces" in optional and "spaces" not in required     # ZeroGPU stays optional
    missing = {}
    for module, files in required.items():
        owners = {canonical(d) for d in dists.get(module, [])}
        if not owners:
            missing[module] = f"not installed here (imported by {sorted(files)[0]})"
        elif not owners & covered:
            missing[module] = f"{sorted(owners)} is not in requirements.txt nor required by it"
    assert missing == {}
    # the direct imports are named, not left to another package's choices
    direct = {canonical(d) for m in required for d in dists.get(m, [])}
    assert {"torch", "transformers", "peft", "huggingface-hub", "gradio", "tokenizers", "pyyaml"} <= direct
    assert direct <= set(reqs) | {"accelerate"}, sorted(direct - set(reqs))


def test_installed_versions_fit_the_ranges():
    bad = {}
    for name, req in requirements().items():
        version = md.version(name)
        if not req.specifier.contains(version.split("+")[0], prereleases=True):
            bad[name] = f"{version} not in {req.specifier}"
    assert bad == {}


def test_hub_module_imports_no_client_by_name():
    """ulmrec/hub.py must import under huggingface_hub 1.x (httpx) and 2.x (httpx2)."""
    tree = ast.parse((ROOT / "ulmrec" / "hub.py").read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not top & {"httpx", "httpx2", "requests"}
