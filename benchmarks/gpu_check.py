"""GPU check of the deployment paths (#7), not run in CI: needs a CUDA machine.

    python benchmarks/gpu_check.py [--models reference,dit-xl] [--steps 20] [--dtype float16]

For the bundled reference DiT and a DiT-XL/2-sized ``DiTTransformer2DModel`` (random weights,
``fastcache_fx.zoo.build("dit", "xl")``) it builds and times, on one synthetic trajectory
(timesteps 999 -> 1, hidden states drifting a little each step, so that the cache decides):

- plain ``torch.compile`` (Inductor): the baseline;
- fastcache + Inductor, with and without ``mode="reduce-overhead"`` (CUDA graphs);
- fastcache + TensorRT (``lowering="tensorrt"``: one engine per glue piece and per branch);
- the exported AOTInductor package and TensorRT engines (``fastcache_fx.export`` +
  ``load_exported``), checked against fastcache + Inductor (same decisions, outputs).

Correctness: each variant's first step (every block computed fully) is compared with plain
Inductor (max relative error). Latency: median per-step milliseconds of the timed trajectory
(after a warm-up trajectory that compiles), and speedup = Inductor median / variant median,
measured in the same run. Prints a table, writes ``benchmarks/gpu_check.json`` and replaces the
``gpu_check`` section of ``benchmarks/RESULTS.md``. Exits with status 2 and a message when no
CUDA device is available.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTION = "gpu_check"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="reference,dit-xl", help="comma list of reference, dit-xl")
    p.add_argument("--steps", type=int, default=20, help="steps of the timed trajectory (default 20)")
    p.add_argument("--batch", type=int, default=2, help="DiT-XL batch (the reference model uses 4: 2 images x CFG)")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threshold", type=float, default=0.05, help="cache_ratio_threshold")
    p.add_argument("--skip", default="", help="comma list of variants to skip (e.g. tensorrt,export-tensorrt)")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "gpu_check.json")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    return p.parse_args(argv)


def trajectory(kw: dict, steps: int):
    """Per-step kwargs: decreasing timesteps, hidden states drifting by 1 % of a fixed noise per step."""
    gen = torch.Generator(device=kw["hidden_states"].device).manual_seed(0)
    x = kw["hidden_states"]
    noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    ts = torch.linspace(999, 1, steps).round().long().tolist()
    return [{**kw, "hidden_states": x + 0.01 * i * noise, "timestep": torch.full_like(kw["timestep"], t)}
            for i, t in enumerate(ts)]


def run_trajectory(fn, steps_kw, reset=None):
    """(outputs, per-step ms) of one trajectory; ``reset`` is called first."""
    if reset is not None:
        reset()
    outs, ms = [], []
    with torch.no_grad():
        for kw in steps_kw:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(**kw)
            torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            outs.append((out.sample if hasattr(out, "sample") else out[0]).float().clone())
    return outs, ms


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_model(name: str, args, skip: set) -> list[dict]:
    import fastcache_fx
    from fastcache_fx.deploy.cli import example_inputs

    dtype = getattr(torch, args.dtype)
    if name == "reference":
        model, kw = example_inputs("reference", "tiny", 4, "cuda", dtype)
    else:
        model, kw = example_inputs("dit", "xl", args.batch, "cuda", dtype)
    steps_kw = trajectory(kw, args.steps)
    config = fastcache_fx.FastCacheConfig(cache_ratio_threshold=args.threshold)
    rows: list[dict] = []
    base_outs = None
    base_ms = None
    backend_outs = backend_dec = None

    def record(variant, build_s, outs, ms, stats=None, extra=None):
        nonlocal base_outs, base_ms
        med = statistics.median(ms[1:] if len(ms) > 1 else ms)
        row = {"model": name, "variant": variant, "build_s": round(build_s, 1), "step_ms": round(med, 3),
               "approx_ratio": round(stats["block_approx_ratio"], 3) if stats else 0.0}
        if base_outs is None:
            base_outs, base_ms = outs, med
        row["speedup"] = round(base_ms / med, 2)
        row["rel_err_step0"] = rel(outs[0], base_outs[0])
        row.update(extra or {})
        rows.append(row)
        print(f"  {variant:<34} build {row['build_s']:>7.1f} s  step {med:9.3f} ms  x{row['speedup']:<6} "
              f"approx {row['approx_ratio']:<5} err0 {row['rel_err_step0']:.2e}", flush=True)

    def variant(label, fn):
        if label.split(" ")[0] in skip:
            return
        try:
            fn()
        except Exception as e:  # keep going: one failing variant must not hide the others
            traceback.print_exc()
            rows.append({"model": name, "variant": label, "error": f"{type(e).__name__}: {e}"[:300]})

    def plain():
        torch._dynamo.reset()
        c = torch.compile(model, dynamic=False)
        t0 = time.perf_counter()
        run_trajectory(c, steps_kw[:1])
        build = time.perf_counter() - t0
        outs, ms = run_trajectory(c, steps_kw)
        record("inductor", build, outs, ms)

    def fastcache(mode=None, lowering="inductor"):
        nonlocal backend_outs, backend_dec
        torch._dynamo.reset()
        c = torch.compile(model, backend=fastcache_fx.FastCacheBackend(config.replace(lowering=lowering), mode=mode),
                          dynamic=False)
        t0 = time.perf_counter()
        run_trajectory(c, steps_kw[:1])
        build = time.perf_counter() - t0
        run_trajectory(c, steps_kw, reset=lambda: fastcache_fx.reset(model))  # warm-up (CUDA graph recording)
        n0 = len(fastcache_fx.stats(model)["trace"])
        outs, ms = run_trajectory(c, steps_kw, reset=lambda: fastcache_fx.reset(model))
        st = fastcache_fx.stats(model)
        dec = [t["approx"] for t in st["trace"][n0:]]
        st = {"block_approx_ratio": sum(map(sum, dec)) / max(1, sum(map(len, dec)))}
        label = f"fastcache+{lowering}" + (f" ({mode})" if mode else "")
        extra = {}
        if lowering == "inductor" and mode is None:
            backend_outs, backend_dec = outs, dec
        elif backend_outs is not None:
            extra = {"same_decisions_as_fastcache_inductor": dec == backend_dec,
                     "max_rel_err_vs_fastcache_inductor": max(rel(a, b) for a, b in zip(outs, backend_outs))}
        record(label, build, outs, ms, st, extra)

    def exported(fmt):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            fastcache_fx.export(model, kw, d, format=fmt, config=config)
            loaded = fastcache_fx.load_exported(d)
            build = time.perf_counter() - t0
            run_trajectory(loaded, steps_kw, reset=loaded.reset)  # warm-up
            n0 = len(loaded.trace)
            outs, ms = run_trajectory(loaded, steps_kw, reset=loaded.reset)
            dec = [t["approx"] for t in loaded.stats()["trace"][n0:]]
            st = {"block_approx_ratio": sum(map(sum, dec)) / max(1, sum(map(len, dec)))}
            extra = {}
            if backend_outs is not None:
                extra = {"same_decisions_as_fastcache_inductor": dec == backend_dec,
                         "max_rel_err_vs_fastcache_inductor": max(rel(a, b) for a, b in zip(outs, backend_outs))}
            record(f"export {fmt}", build, outs, ms, st, extra)

    print(f"{name}: {type(model).__name__}, inputs "
          + ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in kw.items()), flush=True)
    variant("inductor", plain)
    variant("fastcache", lambda: fastcache())
    variant("reduce-overhead", lambda: fastcache(mode="reduce-overhead"))
    variant("tensorrt", lambda: fastcache(lowering="tensorrt"))
    variant("export-aotinductor", lambda: exported("aotinductor"))
    variant("export-tensorrt", lambda: exported("tensorrt"))
    torch._dynamo.reset()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | build (s) | step (ms) | speedup | block_approx_ratio | rel. err. step 0 vs Inductor "
             "| same decisions / max rel. err. vs fastcache+Inductor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        same = ""
        if "same_decisions_as_fastcache_inductor" in r:
            same = f"{r['same_decisions_as_fastcache_inductor']} / {r['max_rel_err_vs_fastcache_inductor']:.1e}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['build_s']} | {r['step_ms']} | {r['speedup']}x "
                     f"| {r['approx_ratio']} | {r['rel_err_step0']:.1e} | {same} |")
    return "\n".join(lines)


def write_results(path: Path, text: str) -> None:
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available on this machine (torch.cuda.is_available() is False); "
              "this check needs an NVIDIA GPU (and torch_tensorrt for the TensorRT rows). Nothing was run.",
              file=sys.stderr)
        return 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("reference", "dit-xl")]
    if bad:
        print(f"gpu_check: --models: unknown {bad} (choose from reference, dit-xl)", file=sys.stderr)
        return 2
    rows = []
    for m in models:
        rows += check_model(m, args, skip)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "dtype": args.dtype, "steps": args.steps}
    tab = table(rows)
    print(tab)
    args.out_json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = (f"## GPU check (`benchmarks/gpu_check.py`)\n\n{meta['date']}, commit {commit}, {meta['gpu']}, "
            f"torch {meta['torch']}, {args.dtype}, {args.steps}-step synthetic trajectory, command "
            f"`{meta['command']}`. Speedup = median step latency of plain Inductor / the variant, same run.\n\n"
            + tab + "\n")
    write_results(args.results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
