"""Per-step cost of online calibration (the in-graph ridge statistics), issue #4.

    python benchmarks/online_cost.py [--models reference,xl] [--xl-layers 2] [--steps 6]

For each model, four compiled variants of ``approx="linear"`` (full-rank maps), each timed on a
trajectory of decreasing timesteps (median step time after one warm-up step):
- file / online, every block computed fully (``enable_block_approx=False``): the accumulation
  cost on full steps (X^T X and X^T Y per block, O(B N D^2), and the float64 adds, O(D^2));
- file / online, every block approximated (a replayed trace of all ones after one full step):
  the cost on approximated steps (zero increments and the masked adds, O(D^2) per block).
Online runs use ``refit_every`` larger than the run (no refit inside the timing); one forced
refit of every block is timed separately (eigendecomposition per block, O(D^3), on the host).
Writes benchmarks/online_cost.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.runtime import registry
from fastcache_fx.calibration import calibrate

ROOT = Path(__file__).resolve().parent.parent


def _model(name: str, layers: int):
    if name == "reference":
        from fastcache_fx import reference as R

        m = R.load().eval()
        b = 2
        kw = {"hidden_states": torch.randn(2 * b, 1, 8, 8), "timestep": torch.full((2 * b,), 999),
              "class_labels": torch.arange(2 * b) % 10}
        return m, kw
    m, kw = zoo.build("dit", "xl", num_layers=layers)
    return m.eval(), kw


def _call(m, kw, t):
    return m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})


def _time_steps(compiled, model, kw, steps: int, approx: bool, n_blocks: int) -> list[float]:
    fastcache_fx.reset(model)
    ts = [999 - 10 * i for i in range(steps + 2)]
    rows = [[False] * n_blocks] + [[approx] * n_blocks] * (steps + 1)
    out = []
    with torch.no_grad(), fastcache_fx.replay_decisions(model, rows):
        for i, t in enumerate(ts):
            t0 = time.perf_counter()
            _call(compiled, kw, t)
            if i >= 2:
                out.append(time.perf_counter() - t0)
    return out


def run_model(name: str, layers: int, steps: int) -> dict:
    model, kw = _model(name, layers)
    n_blocks = len(model.transformer_blocks)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "c.safetensors")
        calibrate(model, lambda m: [_call(m, kw, t) for t in (999, 700, 400)], out=path)
        res = {}
        for variant, opts in (("file", {"calibration": path}),
                              ("online", {"calibration": "online", "refit_every": 10 ** 6})):
            torch._dynamo.reset()
            t0 = time.perf_counter()
            compiled = torch.compile(model, backend="fastcache", dynamic=False,
                                     options={"approx": "linear", "enable_block_approx": False, **opts})
            with torch.no_grad():
                _call(compiled, kw, 999)
            compile_s = time.perf_counter() - t0
            full = _time_steps(compiled, model, kw, steps, False, n_blocks)
            apx = _time_steps(compiled, model, kw, steps, True, n_blocks)
            res[variant] = {"compile_s": compile_s, "full_step_ms": 1e3 * statistics.median(full),
                            "approx_step_ms": 1e3 * statistics.median(apx)}
            if variant == "online":
                rt = registry.lookup(model).graphs[-1]
                t0 = time.perf_counter()
                n = rt.online.refit(rt.weights, force=True)
                res[variant]["refit_all_blocks_s"] = time.perf_counter() - t0
                res[variant]["refitted"] = n
            fastcache_fx.reset(model)
        torch._dynamo.reset()
    shapes = registry.lookup(model).graphs[-1].layout.stream_shapes[0][0]
    res["tokens"] = list(shapes)
    res["blocks"] = n_blocks
    res["full_overhead"] = res["online"]["full_step_ms"] / res["file"]["full_step_ms"] - 1
    res["approx_overhead"] = res["online"]["approx_step_ms"] / res["file"]["approx_step_ms"] - 1
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="reference,xl")
    p.add_argument("--xl-layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a loaded machine)")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "online_cost.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    results = {}
    for name in a.models.split(","):
        results[name] = run_model(name, a.xl_layers, a.steps)
        print(name, json.dumps(results[name]))
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        commit = "unknown"
    record = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": commit, "torch": torch.__version__,
              "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
              "command": "python benchmarks/online_cost.py " + " ".join(sys.argv[1:] if argv is None else argv), "results": results}
    a.out_json.write_text(json.dumps(record, indent=1) + "\n")
    print("| model | [B, N, D] | step, all full: file / online (ms) | overhead | step, all approximated: "
          "file / online (ms) | overhead | refit of all blocks (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} ({r['blocks']} blocks) | {r['tokens']} | {r['file']['full_step_ms']:.1f} / "
              f"{r['online']['full_step_ms']:.1f} | {100 * r['full_overhead']:+.1f} % | {r['file']['approx_step_ms']:.1f} / "
              f"{r['online']['approx_step_ms']:.1f} | {100 * r['approx_overhead']:+.1f} % | "
              f"{r['online']['refit_all_blocks_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
