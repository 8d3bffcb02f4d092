"""Serving: concurrent requests on one compiled model (docs/serving.md).

For each variant (plain Inductor; fastcache with the cache off, ``enable_block_approx=False``;
fastcache with its defaults) one copy of a bundled reference model is compiled once. Every request
(label ``i % 10``, seed ``i``, one image) is first run alone, one after the other, as the
reference; then ``--requests`` requests are sent from a pool of C threads for each concurrency C
in ``--concurrency``, and each image is compared with its own run alone (PSNR over the [-1, 1]
range; "bitwise" counts identical images). Throughput is images per wall-clock second under
concurrency C, latency the seconds from a request's start to its image (p50 / p95). Each request
runs in a ``fastcache_fx.request()`` scope (a no-op for Inductor), as the example server does;
pipeline models (``--model mmdit``) run their own pipeline per request around the shared compiled
transformer, which frees the request's state when the call ends.

Memory (fastcache with its defaults): ``--memory-requests`` more requests at the largest
concurrency; after each checkpoint (requests so far) the live cache state
(``stats()["state_bytes"]``, ``live_requests``) and the process's resident set (now and peak).

    python benchmarks/serving.py [--model dit] [--steps 10] [--requests 8] [--concurrency 1,2,4,8]
                                 [--memory-requests 10,100,1000] [--threads N] [--out benchmarks/serving.json]

The issue's configuration is ``--steps 50 --requests 50 --memory-requests 10,100,1000`` (long);
the defaults finish in a few minutes. Timings need an idle machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx.reference import jobs

HERE = Path(__file__).resolve().parent
VARIANTS = {"inductor": None, "fastcache (cache off)": {"enable_block_approx": False}, "fastcache": {}}


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB over the [-1, 1] range (peak-to-peak 2); inf for identical images."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def build(job, variant: str):
    """The callable ``job.sample`` takes: one copy of the model compiled for ``variant``."""
    model = job.load()
    opts = VARIANTS[variant]
    if opts is None:
        return job.inductor(model)
    if job.pipeline:
        return job.fastcache(model, opts).transformer  # enable_fastcache(pipe)
    return fastcache_fx.enable_fastcache(model, dynamic=False, **opts)


def request(job, fn, i: int, steps: int) -> tuple[torch.Tensor, float]:
    """(image [1, S, S], seconds) of request i."""
    t0 = time.perf_counter()
    with torch.no_grad(), fastcache_fx.request():
        img = job.sample(fn, [i % 10], steps=steps, seeds=[i])[0]
    return img, time.perf_counter() - t0


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_variant(job, variant: str, a) -> dict:
    t0 = time.perf_counter()
    fn = build(job, variant)
    request(job, fn, 0, a.steps)  # compile
    compile_s = time.perf_counter() - t0
    alone = [request(job, fn, i, a.steps)[0] for i in range(a.requests)]
    rows = []
    for c in a.concurrency:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(c) as pool:
            got = list(pool.map(lambda i: request(job, fn, i, a.steps), range(a.requests)))
        wall = time.perf_counter() - t0
        ps = [psnr(img, ref) for (img, _), ref in zip(got, alone)]
        lat = [s for _, s in got]
        row = {"concurrency": c, "images_per_s": a.requests / wall, "wall_s": wall,
               "latency_p50_s": statistics.median(lat), "latency_p95_s": percentile(lat, 0.95),
               "min_psnr_db": min(ps), "bitwise_equal": sum(p == math.inf for p in ps),
               "all_equal": all(p > 100 for p in ps)}
        if variant != "inductor":
            st = fastcache_fx.stats(fn)
            row.update(block_approx_ratio=st["block_approx_ratio"], live_requests_after=st["live_requests"],
                       state_bytes_after=st["state_bytes"], evictions=st["evictions"])
        rows.append(row)
        print(f"  {variant:>22}  C={c}: {row['images_per_s']:.2f} images/s, p50 {row['latency_p50_s']:.2f} s, "
              f"p95 {row['latency_p95_s']:.2f} s, min PSNR vs alone {row['min_psnr_db']:.1f} dB, "
              f"bitwise {row['bitwise_equal']}/{a.requests}", flush=True)
    out = {"variant": variant, "compile_s": compile_s, "rows": rows}
    if variant == "fastcache" and a.memory_requests:
        out["memory"] = memory(job, fn, a)
    return out


def memory(job, fn, a) -> list[dict]:
    """Live state and RSS after each checkpoint of ``--memory-requests`` requests."""
    c = max(a.concurrency)
    done, rows = 0, []
    st = fastcache_fx.stats(fn)
    rows.append({"requests": 0, "state_bytes": st["state_bytes"], "live_requests": st["live_requests"],
                 "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()})
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        for n in a.memory_requests:
            list(pool.map(lambda i: request(job, fn, i, a.memory_steps), range(done, n)))
            done = n
            st = fastcache_fx.stats(fn)
            per = [r["state_bytes"] for r in st["requests"].values() if not r["live"]]
            rows.append({"requests": n, "state_bytes": st["state_bytes"], "live_requests": st["live_requests"],
                         "state_bytes_per_request": max(per) if per else 0, "rss_bytes": rss_bytes(),
                         "peak_rss_bytes": peak_rss_bytes()})
            print(f"  after {n:>5} requests: live state {st['state_bytes'] / 1e6:.2f} MB in {st['live_requests']} "
                  f"requests, RSS {rows[-1]['rss_bytes'] / 1e6:.0f} MB (peak {rows[-1]['peak_rss_bytes'] / 1e6:.0f} MB)",
                  flush=True)
    return rows


def table(results: list[dict], a) -> str:
    base = {r["concurrency"]: r["images_per_s"] for r in results[0]["rows"]}
    lines = ["| variant | C | images/s | vs Inductor | p50 s | p95 s | cache share | equal to alone (min PSNR) |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            share = f"{r['block_approx_ratio']:.2f}" if "block_approx_ratio" in r else "-"
            eq = f"{r['bitwise_equal']}/{a.requests} bitwise" if r["bitwise_equal"] == a.requests else \
                f"{'yes' if r['all_equal'] else 'NO'} ({r['min_psnr_db']:.1f} dB)"
            lines.append(f"| {res['variant']} | {r['concurrency']} | {r['images_per_s']:.2f} | "
                         f"{r['images_per_s'] / base[r['concurrency']]:.2f}x | {r['latency_p50_s']:.2f} | "
                         f"{r['latency_p95_s']:.2f} | {share} | {eq} |")
    mem = next((r["memory"] for r in results if "memory" in r), None)
    if mem:
        lines += ["", "| requests | live state MB | live requests | RSS MB | peak RSS MB |", "|---|---|---|---|---|"]
        lines += [f"| {m['requests']} | {m['state_bytes'] / 1e6:.2f} | {m['live_requests']} | {m['rss_bytes'] / 1e6:.0f} | "
                  f"{m['peak_rss_bytes'] / 1e6:.0f} |" for m in mem]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit", choices=jobs.MODELS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency level (the issue: 50)")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--memory-requests", default="10,100", help="checkpoints, e.g. 10,100,1000 ('' skips)")
    p.add_argument("--memory-steps", type=int, default=2, help="denoising steps of the memory requests")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (torch.set_num_threads); concurrent requests share them, so on a "
                        "busy or small machine cores / C avoids OpenMP oversubscription")
    p.add_argument("--out", default=str(HERE / "serving.json"))
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    a.concurrency = [int(x) for x in a.concurrency.split(",")]
    a.memory_requests = sorted(int(x) for x in a.memory_requests.split(",") if x)
    variants = a.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or a.steps < 1 or a.requests < 1 or min(a.concurrency) < 1:
        p.error(f"bad --variants {bad} / --steps / --requests / --concurrency")
    job = jobs.job(a.model)
    print(f"{job.title}: {a.requests} requests x {a.steps} steps at concurrency {a.concurrency}; "
          f"{torch.get_num_threads()} intra-op threads", flush=True)
    results = [run_variant(job, v, a) for v in variants]
    text = table(results, a)
    print(text)
    Path(a.out).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": a.model, "steps": a.steps, "requests": a.requests, "concurrency": a.concurrency,
        "memory_steps": a.memory_steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "results": results, "table": text}, indent=1, default=str))
    print(f"wrote {a.out}")
    ok = all(r["all_equal"] for res in results for r in res["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
