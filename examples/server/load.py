"""Load for the example server: a bounded number of requests to a server on this machine, some at
once; prints one line per request and a summary, then exits (docs/serving.md).

    python examples/server/load.py --requests 16 --concurrency 4

Only loopback addresses are accepted (127.0.0.1, ::1, localhost): it is a local test tool.
Exits with status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
import urllib.request
from urllib.parse import urlparse

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=16, help="requests in all (1..10000)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (1..64)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    a = p.parse_args(argv)
    host = urlparse(a.url).hostname
    if host not in LOOPBACK:
        p.error(f"--url: only a server on this machine ({', '.join(sorted(LOOPBACK))}), got {host!r}")
    if not 1 <= a.requests <= 10000:
        p.error("--requests: expected 1..10000")
    if not 1 <= a.concurrency <= 64:
        p.error("--concurrency: expected 1..64")
    base = a.url.rstrip("/")

    def one(i: int) -> dict:
        body = {"label": i % 10, "seed": i}
        if a.steps:
            body["steps"] = a.steps
        t0 = time.perf_counter()
        r = post(base + "/generate", body, a.timeout)
        r["latency"] = time.perf_counter() - t0
        print(f"{r['id']:>12}  label {r['label']}  {r['seconds']:.2f} s (+{r['queued_seconds']:.2f} queued)  "
              f"cache share {r['block_approx_ratio']:.2f}  state {r['state_bytes'] / 1e6:.2f} MB", flush=True)
        return r

    t0 = time.perf_counter()
    failed = 0
    done = []
    with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
        for f in concurrent.futures.as_completed([pool.submit(one, i) for i in range(a.requests)]):
            try:
                done.append(f.result())
            except Exception as e:  # a failed request is counted and reported, the others go on
                failed += 1
                print(f"request failed: {e}", file=sys.stderr)
    wall = time.perf_counter() - t0
    lat = sorted(r["latency"] for r in done)
    if lat:
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        print(f"{len(done)} done, {failed} failed in {wall:.1f} s: {len(done) / wall:.2f} images/s, latency p50 "
              f"{statistics.median(lat):.2f} s, p95 {p95:.2f} s, mean cache share "
              f"{statistics.mean(r['block_approx_ratio'] for r in done):.2f}")
    print("server:", json.dumps(get(base + "/stats", a.timeout)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
