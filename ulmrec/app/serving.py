"""Open a bundle as the app and serve it: shared by the command line and a Hugging Face Space."""
from __future__ import annotations

import os
from pathlib import Path

# no telemetry, no update checks: the app makes no network calls of its own
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def set_threads(threads: int, concurrency: int) -> int:
    """Oversubscribed cores cost more than they give: on a shared 2-core machine a 2-thread
    forward pass took 2-9 s against 1.3 s with one thread."""
    import torch
    n = threads or max(1, (os.cpu_count() or 1) // max(1, concurrency))
    torch.set_num_threads(n)
    return n


def open_app(source=None, preload: bool = True, bf16: bool = False, int8: bool = False):
    """(AppData, gr.Blocks) for a bundle; BundleError when it cannot be used."""
    from ulmrec.bundle import load_bundle
    source = source or os.environ.get("ULMREC_BUNDLE") or None
    if source is None or Path(str(source)).expanduser().exists():
        # a local bundle needs nothing from the Hub: keep the libraries offline
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .logic import prepare, warm, warm_decoder
    from .ui import build_demo
    data = prepare(load_bundle(source), bf16=bf16, int8=int8)
    if preload:
        warm(data)
        warm_decoder(data)
    return data, build_demo(data)


def serve(demo, host=None, port=None, concurrency: int = 1, block: bool = True, mcp: bool = False):
    """Launch; `mcp` also serves the named endpoints (/recommend, /rank, …) as MCP tools at
    /gradio_api/mcp/ (needs the `mcp` package: pip install "gradio[mcp]")."""
    from .ui import CSS
    if mcp:
        try:
            import mcp as _  # noqa: F401  (Gradio's MCP server is built on it)
        except ImportError:
            raise SystemExit('--mcp needs the mcp package: pip install "gradio[mcp]"') from None
    demo.queue(default_concurrency_limit=concurrency, max_size=64)
    return demo.launch(server_name=host, server_port=port, css=CSS, show_error=True, mcp_server=mcp,
                       prevent_thread_lock=not block, footer_links=["api"], ssr_mode=False)
