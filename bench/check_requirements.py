"""A fresh venv from requirements.txt alone imports every module the app loads.

    python bench/check_requirements.py                        # torch from the index (large)
    python bench/check_requirements.py --torch "torch==2.13.0"   # e.g. the local CPU build
    python bench/check_requirements.py --keep /tmp/fresh      # keep the venv there

Creates a venv (no system site-packages), installs `--torch` first (so a CPU build can stand in
for the CUDA default), then `pip install -r requirements.txt` and nothing else, and imports
app.py's modules and every module of the ulmrec package in it. It needs a package index
(network or a mirror) and minutes, so the test suite runs the fast, offline half instead
(tests/test_requirements.py: every import covered by a requirement, versions in range).
Exit 0 when every module imports; else the failures, one per line.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = r"""
import importlib, pkgutil, sys, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, sys.argv[1])
import ulmrec
names = ["app"] + ["ulmrec"] + [m.name for m in pkgutil.walk_packages(ulmrec.__path__, "ulmrec.")]
bad = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every failure
        bad.append(f"{name}: {type(e).__name__}: {e}")
import gradio, torch, transformers, peft, huggingface_hub
print(f"imported {len(names) - len(bad)}/{len(names)} modules; torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, gradio {gradio.__version__}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", default=None, help="pip requirement installed first (e.g. torch==2.13.0)")
    p.add_argument("--keep", default=None, help="build the venv here and keep it")
    args = p.parse_args(argv)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ulmrec-fresh-"))
    t0 = time.time()
    venv.create(folder, with_pip=True, clear=True)
    py = folder / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if args.torch:
        subprocess.run(pip + [args.torch], check=True)
    subprocess.run(pip + ["-r", str(ROOT / "requirements.txt")], check=True)
    print(f"venv ready in {time.time() - t0:.0f} s: {folder}")
    result = subprocess.run([str(py), "-c", PROBE, str(ROOT)], cwd=tempfile.gettempdir())
    if not args.keep:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
