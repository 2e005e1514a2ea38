"""Gradio app latency on a real bundle, end to end through the served app (loopback only).

    python bench/app.py [--bundle /tmp/quick-bundle] [--users 20] [--ladders 3]

Launches `python app.py` as a child process and measures:
  server_ready_s  launch → the page answers HTTP 200 (bundle + model loaded before serving)
  first_chart_s   launch → headless chromium shows the first user's ranking chart
                  (skipped when /usr/bin/chromium is absent)
  rank p50/p90    one user per request, one at a time, through the queue, after 2 warm-up requests
  burst p50/p95   --burst requests (default 20) sent at once, each timed from its submit to its
                  answer: they share forward passes (ulmrec.app.ranking.RankBatcher)
  ladder          the 4-rung decode (<a> … full index) for one user, one request
  catalogue       LC-Rec's trie-constrained beam search (beam 20, top-10) for one user, when
                  the bundle carries the LC-Rec part (the first call, which loads it, untimed)
Prints one JSON line (appended to --log when given) and one markdown table row.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))      # `python bench/app.py` from anywhere
from ulmrec.report import markdown_table  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc, timeout: float) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} not up after {timeout:.0f} s")


def first_chart(url: str) -> float | None:
    """Time at which the first ranking chart is drawn in a headless browser."""
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#chart .ytick text", timeout=180_000)
        t = time.perf_counter()
        browser.close()
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=os.environ.get("ULMREC_BUNDLE", str(ROOT / "assets" / "demo")))
    ap.add_argument("--users", type=int, default=20, help="timed ranking requests")
    ap.add_argument("--ladders", type=int, default=3, help="timed ladder requests")
    ap.add_argument("--catalogues", type=int, default=3,
                    help="timed whole-catalogue (LC-Rec) requests, when the bundle has that part")
    ap.add_argument("--burst", type=int, default=20,
                    help="concurrent /rank requests sent at once (0: skip)")
    ap.add_argument("--new-users", type=int, default=5,
                    help="timed /recommend requests for new histories (bundles with a retriever)")
    ap.add_argument("--concurrency", type=int, default=1, help="passed to app.py")
    ap.add_argument("--bf16", action="store_true", help="passed to app.py (CPU bfloat16)")
    ap.add_argument("--int8", action="store_true", help="passed to app.py (CPU int8, torchao weight-only)")
    ap.add_argument("--log", type=Path, default=None,
                    help="also append the JSON line to this file (e.g. results/app-latency-games.jsonl)")
    args = ap.parse_args(argv)

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    load_before = os.getloadavg()[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--bundle", args.bundle,
                             "--port", str(port), "--concurrency", str(args.concurrency)]
                            + (["--bf16"] if args.bf16 else []) + (["--int8"] if args.int8 else []),
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = wait_http(url, proc, 600) - t0
        chart = first_chart(url)
        from gradio_client import Client
        client = Client(url, verbose=False)
        from ulmrec.bundle import load_bundle
        bundle = load_bundle(args.bundle, check_hashes=False)
        users = bundle.candidates.query("split == 'test'")["user"]
        users = [int(u) for u in users.iloc[: args.users + 2]]
        for u in users[:2]:                                   # warm-up
            client.predict(u, False, api_name="/rank")
        rank_s = []
        for u in users[2:]:
            t = time.perf_counter()
            status, *_ = client.predict(u, False, api_name="/rank")
            rank_s.append(time.perf_counter() - t)
            assert status == "", status
        burst_s = []
        if args.burst:
            from concurrent.futures import ThreadPoolExecutor
            burst_users = [int(u) for u in
                           bundle.candidates.query("split == 'test'")["user"].iloc[-args.burst:]]

            def one(u):
                t = time.perf_counter()
                status, *_ = client.predict(u, False, api_name="/rank")
                assert status == "", status
                return time.perf_counter() - t
            with ThreadPoolExecutor(max_workers=len(burst_users)) as pool:
                burst_s = list(pool.map(one, burst_users))
        ladder_s = []
        for u in users[: args.ladders]:
            t = time.perf_counter()
            status, table = client.predict(u, api_name="/ladder")
            ladder_s.append(time.perf_counter() - t)
            assert status == "" and len(table["data"]) >= 1, status
        new_s, new_ladder_s = [], []
        if bundle.has_retriever and args.new_users:
            # a table user's last 5 items stand in for a person typing a history of their own
            hists = [[str(i) for i in h[-5:]] for h in bundle.users["history"].iloc[: args.new_users + 1]]
            client.predict(hists[0], "", False, api_name="/recommend")           # warm-up
            for h in hists[1:]:
                t = time.perf_counter()
                rec = client.predict(h, "", False, api_name="/recommend")
                new_s.append(time.perf_counter() - t)
                assert len(rec["candidates"]) == 20
                t = time.perf_counter()
                rec = client.predict(h, "", True, api_name="/recommend")
                new_ladder_s.append(time.perf_counter() - t)
                assert rec["ladder"] or not rec["index"]
        catalogue_s = []
        if bundle.has_lcrec:       # the first call loads the second model: not timed
            client.predict(users[0], api_name="/catalogue")
            for u in users[1: args.catalogues + 1]:
                t = time.perf_counter()
                status, _, table = client.predict(u, api_name="/catalogue")
                catalogue_s.append(time.perf_counter() - t)
                assert status == "" and len(table["data"]) >= 1, status
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {"bundle": args.bundle, "cpu_count": os.cpu_count(), "concurrency": args.concurrency, "bf16": args.bf16,
              "int8": args.int8,
              "server_ready_s": round(ready, 2),
              "first_chart_s": round(chart - t0, 2) if chart else None,
              "rank_p50_s": round(float(np.percentile(rank_s, 50)), 3),
              "rank_p90_s": round(float(np.percentile(rank_s, 90)), 3), "rank_n": len(rank_s),
              "burst_n": len(burst_s),
              "burst_p50_s": round(float(np.percentile(burst_s, 50)), 2) if burst_s else None,
              "burst_p95_s": round(float(np.percentile(burst_s, 95)), 2) if burst_s else None,
              "ladder_mean_s": round(float(np.mean(ladder_s)), 2), "ladder_n": len(ladder_s),
              "catalogue_mean_s": round(float(np.mean(catalogue_s)), 2) if catalogue_s else None,
              "catalogue_n": len(catalogue_s),
              "new_user_p50_s": round(float(np.percentile(new_s, 50)), 3) if new_s else None,
              "new_user_max_s": round(float(np.max(new_s)), 3) if new_s else None,
              "new_user_with_ladder_mean_s": round(float(np.mean(new_ladder_s)), 2) if new_ladder_s else None,
              "new_user_n": len(new_s),
              "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    print(json.dumps(result))
    if args.log is not None:
        with args.log.open("a") as f:
            f.write(json.dumps(result) + "\n")
    cat = f"{result['catalogue_mean_s']:.1f} s" if catalogue_s else "—"
    fc = f"{result['first_chart_s']:.1f} s" if chart else "—"
    dtype = "bf16" if args.bf16 else "int8" if args.int8 else "fp32"
    new_user = [f"{result['new_user_p50_s']:.2f} s", f"{result['new_user_with_ladder_mean_s']:.1f} s"] \
        if new_s else ["—", "—"]
    row = [Path(args.bundle).name, dtype, f"{result['server_ready_s']:.1f} s", fc,
           f"{result['rank_p50_s']:.2f} s", f"{result['rank_p90_s']:.2f} s",
           f"{result['burst_p50_s'] or '—'} s", f"{result['burst_p95_s'] or '—'} s",
           f"{result['ladder_mean_s']:.1f} s", cat, *new_user, f"{load_before:.1f}, {os.getloadavg()[0]:.1f}"]
    print(markdown_table(["bundle", "dtype", "server ready", "first chart", "rank p50", "rank p90",
                          f"{len(burst_s)} at once p50", "p95", "ladder (4 rungs)",
                          "whole catalogue (LC-Rec top-10)", "new user (candidates + index + rank) p50",
                          "new user + ladder", "load avg (before, after)"], [row], "llrrrrrrrrrrl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
