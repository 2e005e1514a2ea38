"""The README's screenshot: the app's first screen on a bundle, in headless Debian chromium.

    python bench/screenshot.py --bundle assets/games --out docs/img/games.png
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/screenshot.py` from anywhere


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="assets/games")
    ap.add_argument("--out", default="docs/img/games.png")
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1500)
    ap.add_argument("--wait", type=float, default=30.0, help="seconds for the first ranking to draw")
    ap.add_argument("--chromium", default=os.environ.get("ULMREC_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from ulmrec.app.cli import open_app, serve
    _, demo = open_app(args.bundle)
    serve(demo, "127.0.0.1", args.port, concurrency=1, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{args.port}")
            page.wait_for_selector(".plotly", state="attached")
            time.sleep(args.wait)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".tmp.png")
            page.screenshot(path=str(tmp), full_page=False)
            tmp.replace(args.out)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
