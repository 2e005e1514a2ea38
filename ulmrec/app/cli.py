"""Load the bundle and the model once, then serve the page (one shared model, a bounded queue)."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from .serving import open_app, serve, set_threads
from .space import on_space

log = logging.getLogger("ulmrec.app")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="ULMRec demo: explore users, their "
                                "semantic index and the LLM's ranking of their candidates.")
    p.add_argument("--bundle", default=None, help="bundle folder or Hub repo id "
                   "(default: $ULMREC_BUNDLE, else assets/demo)")
    p.add_argument("--host", default=None, help="interface to bind (default: $GRADIO_SERVER_NAME, "
                   "else 127.0.0.1; 0.0.0.0 to serve the network)")
    p.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests the model serves at once; the rest wait in the queue (on 2 CPU "
                   "cores one request with both threads ranks a user in 0.93 s p50, two at once "
                   "with one thread each in 1.31 s: bench/app.py)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: CPU cores / concurrency, so that concurrent "
                   "requests do not oversubscribe the cores)")
    p.add_argument("--bf16", action="store_true",
                   help="CPU: run the model in bfloat16 (~40%% faster; probabilities differ "
                   "slightly from the evaluated fp32 model)")
    p.add_argument("--int8", action="store_true",
                   help="CPU: the ranker's linear layers stored in int8 (torchao weight-only: "
                   "a quarter of their memory; speed and agreement with fp32 in "
                   "bench/quantize.py and docs/app.md)")
    p.add_argument("--mcp", action="store_true",
                   help="also serve the endpoints as MCP tools (Gradio's MCP server, "
                        "/gradio_api/mcp/; needs gradio[mcp])")
    p.add_argument("--no-preload", action="store_true",
                   help="load the model on the first request instead of before serving")
    args = p.parse_args(argv)
    if args.bf16 and args.int8:
        p.error("choose one of --bf16 and --int8")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if on_space():  # a Hugging Face Space: Hub defaults, a setup page instead of an exit
        from .space import main as space_main
        return space_main(args)
    from ulmrec.bundle import BundleError
    from ulmrec.hub import HubError
    t0 = time.perf_counter()
    try:
        data, demo = open_app(args.bundle, preload=not args.no_preload, bf16=args.bf16,
                              int8=args.int8)
    except (BundleError, HubError) as e:
        print(f"error: cannot open the bundle: {e}", file=sys.stderr)
        return 2
    threads = set_threads(args.threads, args.concurrency)
    log.info("bundle ready in %.1f s (%d users); %d torch thread(s) per request, %d at once",
             time.perf_counter() - t0, len(data.users), threads, args.concurrency)
    serve(demo, args.host, args.port, args.concurrency, mcp=args.mcp)
    return 0
