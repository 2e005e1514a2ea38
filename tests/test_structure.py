"""The import structure: data → retrieval → indexing → tasks → model → ranker → bundle → app, with
no circles and no climbs back up. Every import counts, the ones inside functions too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str], name: str | None = None) -> set[str]:
    """Project modules that `path` imports, wherever in the file the import stands."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:        # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph(folders: tuple[str, ...]) -> dict[str, set[str]]:
    files = [p for f in folders for p in (ROOT / f).rglob("*.py")]
    known = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, known) for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            # a submodule reaching its own package's __init__ is how Python loads it, not a circle
            if v.startswith(w + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_circle():
    graph = _graph(("ulmrec",))
    assert len(graph) > 40                   # the walk found the library
    assert _cycles(graph) == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checker itself: imports inside functions, relative ones and `from pkg import sub`
    are followed, and a circle they make is found."""
    known = {"ulmrec", "ulmrec.decode", "ulmrec.app", "ulmrec.app.ui", "ulmrec.lcrec",
             "ulmrec.lcrec.trie", "ulmrec.mod"}
    local = tmp_path / "mod.py"
    local.write_text("import json\n\ndef f():\n    from . import decode\n\n"
                     "class C:\n    def g(self):\n        from .app.ui import build_demo\n"
                     "        from ulmrec.lcrec import trie\n")
    assert _imports(local, known, name="ulmrec.mod") == {
        "ulmrec", "ulmrec.decode", "ulmrec.app.ui", "ulmrec.lcrec", "ulmrec.lcrec.trie"}
    graph = {"ulmrec.a": {"ulmrec.b"}, "ulmrec.b": {"ulmrec.a"}, "ulmrec.c": {"ulmrec.a"},
             "ulmrec.p.x": {"ulmrec.p"}, "ulmrec.p": {"ulmrec.p.x"}}
    assert _cycles(graph) == [["ulmrec.a", "ulmrec.b"]]


def test_lower_modules_never_reach_up_to_the_app_or_the_command_line():
    graph = _graph(("ulmrec",))
    for module, targets in graph.items():
        if not module.startswith("ulmrec.app"):
            assert not {t for t in targets if t.startswith("ulmrec.app")}, module
        assert not {t for t in targets if t == "train" or t.startswith("train.")}, module


def test_benchmarks_use_the_library_not_the_command_line():
    known = set(_graph(("ulmrec", "train", "bench")))
    for path in (ROOT / "bench").rglob("*.py"):
        bad = {t for t in _imports(path, known) if t == "train" or t.startswith("train.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
