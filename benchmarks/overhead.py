"""Overhead of the fastcache rewrite and speed of each approximation kind (issue #2 benchmark).

DiT-XL/2-sized DiTTransformer2DModel (28 blocks, width 1152, 16 heads, 256 tokens), batch 2,
random weights, fp32, CPU. In one run: plain torch.compile (Inductor) vs fastcache with
approximation disabled, and fastcache with every block forced to each approximation kind
(threshold made huge, warmup 1, no limit on consecutive approximations). Prints a table and
writes JSON; speed is reported as a ratio against the Inductor baseline of the same run.

    python benchmarks/overhead.py [--layers 28] [--steps 6] [--kinds residual,linear,residual_linear]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import zoo


def _step_times(fn, kw, steps: int) -> list[float]:
    times = []
    for i in range(steps):
        kw["timestep"] = torch.full_like(kw["timestep"], 999 - 10 * i)  # one decreasing trajectory
        t0 = time.perf_counter()
        fn(**kw)
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after a compile call)")
    p.add_argument("--kinds", default="residual,linear,residual_linear")
    p.add_argument("--out", type=Path, default=Path("benchmarks/overhead.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    model, kw = zoo.build("dit", size="xl", num_layers=a.layers)
    variants = [("inductor", None), ("fastcache, approx disabled", {"enable_block_approx": False})]
    forced = {"cache_ratio_threshold": 1e6, "warmup_steps": 1, "max_consecutive_approx": 10 ** 6}
    kinds = [k for k in a.kinds.split(",") if k]
    calibs = {}
    for k in kinds:
        if k != "residual":  # one calibration file per kind: linear fits Y, residual_linear fits dR
            calibs[k] = str(Path(tempfile.mkdtemp()) / f"calib_{k}.safetensors")
            fastcache_fx.calibrate(model, lambda m: [m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})
                                                     for t in (900, 500)], out=calibs[k], kind=k)
    for k in kinds:
        opts = {**forced, "approx": k}
        if k != "residual":
            opts["calibration"] = calibs[k]
        variants.append((f"fastcache, all blocks {k}", opts))

    rows = []
    for name, opts in variants:
        torch._dynamo.reset()
        backend = "inductor" if opts is None else fastcache_fx.FastCacheBackend(**opts)
        compiled = torch.compile(model, backend=backend, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(**kw)
            compile_s = time.perf_counter() - t0
            times = _step_times(compiled, dict(kw), a.steps)
        # steps after the first (always full for fastcache) are the steady state
        steady = sorted(times[1:])[len(times[1:]) // 2]
        rows.append({"variant": name, "compile_s": compile_s, "median_step_s": steady, "step_s": times})
        print(f"  {name}: compile {compile_s:.1f} s, median step {steady * 1000:.1f} ms", flush=True)
        fastcache_fx.reset(model)
    base = rows[0]["median_step_s"]
    for r in rows:
        r["latency_vs_inductor"] = r["median_step_s"] / base
        r["speedup_vs_inductor"] = base / r["median_step_s"]
    print(f"\nDiT-XL/2-sized, {a.layers} blocks, batch 2, 256 tokens, fp32, CPU ({torch.get_num_threads()} threads)")
    print("| variant | compile (s) | step (ms) | latency / Inductor | speedup |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['compile_s']:.1f} | {r['median_step_s'] * 1000:.1f} | "
              f"{r['latency_vs_inductor']:.3f} | {r['speedup_vs_inductor']:.2f}x |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": a.layers, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
