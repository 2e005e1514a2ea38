"""Where the project keeps derived files: one place for every stage, the app and the tests."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | Path) -> Path:
    """A relative output folder (results/, assets/…) lives in the repository, not the cwd."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def display_path(path: str | Path) -> str:
    """A path as written into results and artifacts: relative to the repository when inside
    it, else only its last three parts (never this machine's layout)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return "/".join(path.parts[-3:])


def cache_root() -> Path:
    """Processed data, embeddings and converted backbones (ULMREC_CACHE overrides)."""
    return Path(os.environ.get("ULMREC_CACHE", REPO_ROOT / "cache"))


def runs_root() -> Path:
    """Stage outputs, runs/<dataset>/<stage>/ (ULMREC_RUNS overrides)."""
    return Path(os.environ.get("ULMREC_RUNS", REPO_ROOT / "runs"))


def atomic_write(path: Path, write) -> None:
    """write(tmp: Path) into a sibling temp file, then rename over `path`: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data, **dumps) -> None:
    """JSON (indent 1, unknown types as str) written through atomic_write, as UTF-8."""
    text = json.dumps(data, **{"indent": 1, "default": str, **dumps})
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_dir(target: Path, fill) -> None:
    """fill(tmp: Path) a sibling temp folder, then swap it in: never half a folder on disk."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        fill(tmp)
        old = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) the way huggingface_hub reads it, but checked
    now (huggingface_hub reads it once, at import). Unset means online, as for huggingface_hub
    itself: the one meaning for bundles and base models alike (ulmrec.ranker.load_base)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def prediction_suffix(no_history: bool = False, block: int = 0, orders: int = 1) -> str:
    """What tells a run's prediction and fusion files apart: _uid (no history), _b<block> (a
    second sample of test users), _o<orders> (scored over several candidate orders)."""
    return (("_uid" if no_history else "") + (f"_b{block}" if block else "")
            + (f"_o{orders}" if orders > 1 else ""))


def orders_name(run: str, orders: int = 1) -> str:
    """A system's row name when its lists were scored over several candidate orders."""
    return run if orders <= 1 else f"{run} × {orders} orders"
