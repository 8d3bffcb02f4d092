"""Compile time and step latency: whole-graph vs regional compilation, with and without fastcache.

DiT-XL/2-sized ``DiTTransformer2DModel`` (width 1152, 16 heads, 256 tokens, batch 2, random
weights, fp32) at several depths. For each depth, in one run:

- ``inductor``: plain ``torch.compile`` of the whole transformer;
- ``regional inductor``: every block compiled on its own (diffusers' ``compile_repeated_blocks``
  does this for models with ``_repeated_blocks``; DiT has none, so its blocks are compiled
  with ``block.compile()`` as that method would);
- ``fastcache``: ``torch.compile(model, backend="fastcache")``, one graph, a cond per block;
- ``regional fastcache``: ``enable_fastcache(model, regional=True)``.

Compile time is the wall time of the first call (tracing + lowering + one step). Step latency
is the median over ``--steps`` calls of one decreasing trajectory, with approximation off
(``enable_block_approx=False``), and, for the fastcache variants, with every block forced to the
residual approximation (``replay_decisions`` with all-True rows: the first step has no anchor
and is computed fully; the median is over the later steps). Speed is reported as a ratio to
plain Inductor at the same depth.

    python benchmarks/compile_time.py [--layers 8,16,28] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import zoo

VARIANTS = ("inductor", "regional inductor", "fastcache", "regional fastcache")


def _build(layers: int):
    torch._dynamo.reset()
    return zoo.build("dit", size="xl", num_layers=layers, seed=0)


def _compile(variant: str, model, **opts):
    if variant == "inductor":
        return torch.compile(model, backend="inductor")
    if variant == "regional inductor":
        for block in model.transformer_blocks:
            block.compile(backend="inductor")
        return model
    if variant == "fastcache":
        return torch.compile(model, backend=fastcache_fx.FastCacheBackend(**opts))
    return fastcache_fx.enable_fastcache(model, regional=True, **opts)


def _steps(fn, kw, steps: int, t0: int = 999) -> list[float]:
    times = []
    for i in range(steps):
        kw["timestep"] = torch.full_like(kw["timestep"], t0 - 10 * i)  # one decreasing trajectory
        start = time.perf_counter()
        with torch.no_grad():
            fn(**kw)
        times.append(time.perf_counter() - start)
    return times


def measure(variant: str, layers: int, steps: int) -> dict:
    """One variant at one depth: compile seconds, median step (approximation off), and for the
    fastcache variants the median step with every block forced to residual reuse."""
    model, kw = _build(layers)
    fc = "fastcache" in variant
    fn = _compile(variant, model, **({"enable_block_approx": False} if fc else {}))
    start = time.perf_counter()
    with torch.no_grad():
        fn(**kw)
    row = {"variant": variant, "layers": layers, "compile_s": time.perf_counter() - start,
           "step_ms": 1e3 * statistics.median(_steps(fn, kw, steps))}
    if fc:
        graphs = fastcache_fx.stats(model)["graphs"]
        model, kw = _build(layers)
        fn = _compile(variant, model)
        with torch.no_grad():
            fn(**kw)  # compile, outside the replay
        fastcache_fx.reset(model)
        with fastcache_fx.replay_decisions(model, [[True] * layers] * (steps + 1)):
            forced = _steps(fn, kw, steps + 1)[1:]
        row["forced_residual_step_ms"] = 1e3 * statistics.median(forced)
        row["approx_ratio_forced"] = fastcache_fx.stats(model)["block_approx_ratio"]
        row["graphs"] = graphs
    return row


def _table(rows: list[dict]) -> str:
    base = {r["layers"]: r for r in rows if r["variant"] == "inductor"}
    lines = ["| blocks | variant | compile (s) | compile / inductor | step, approx off (ms) | step / inductor "
             "| step, all residual (ms) | saving vs own approx-off step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base[r["layers"]]
        forced = r.get("forced_residual_step_ms")
        lines.append(f"| {r['layers']} | {r['variant']} | {r['compile_s']:.1f} | {r['compile_s'] / b['compile_s']:.2f} "
                     f"| {r['step_ms']:.1f} | {r['step_ms'] / b['step_ms']:.3f} | "
                     + (f"{forced:.1f} | {r['step_ms'] / forced:.1f}x |" if forced else "- | - |"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="8,16,28", help="comma-separated depths")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant (after the compile call)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=Path("benchmarks/compile_time.json"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if "inductor" not in variants:
        raise ValueError("--variants: 'inductor' is the baseline and must be included")
    rows = []
    for layers in [int(x) for x in a.layers.split(",")]:
        for v in variants:
            rows.append(measure(v, layers, a.steps))
            print(f"  {layers} blocks, {v}: compile {rows[-1]['compile_s']:.1f} s, step {rows[-1]['step_ms']:.1f} ms",
                  flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"rows": rows, "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                                        "load_avg": list(__import__("os").getloadavg())},
              "torch": torch.__version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "command": "python benchmarks/compile_time.py " + " ".join(argv or __import__("sys").argv[1:])}
    print(_table(rows))
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
