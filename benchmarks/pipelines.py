"""Real diffusers pipelines: plain torch.compile vs enable_fastcache, and what dynamic shapes
save in compiles (issue 16, "Measure").

For each family (DiT, PixArt-Sigma, SD3, Flux with true CFG, Sana; ``zoo.pipeline``: built
offline, random weights, widened with ``--layers/--heads/--head-dim``; and the video pipelines of
``zoo_video``: Wan 2.1, HunyuanVideo 1.5, LTX, CogVideoX, tiny parts, ``--layers`` blocks, called
at two frame counts), in one process:

- speed: seconds per image at the first and the last of ``--sizes`` (median of ``--repeats``
  calls after the compiling one and one more untimed call) for plain ``torch.compile`` (Inductor) and ``enable_fastcache``,
  both with torch.compile's defaults; the ratio is taken within this run. Random weights make
  live decisions meaningless, so by default fastcache follows a fixed decision schedule
  (``--decisions schedule``: 2 warmup steps full, then 3 approximated steps out of every 4 for
  every block, ~0.65 of the block-steps at 20 steps, like the bundled trained DiT's demo at the
  default threshold); ``--decisions live`` decides with ``--threshold`` instead.
- compiles: for every size in order (three by default), the graphs Dynamo compiled and the
  seconds spent compiling, with dynamic shapes (torch.compile's default: the second size
  recompiles with symbolic shapes, later sizes reuse that graph) and with ``dynamic=False``
  (one static graph per size), for Inductor and fastcache.

Each variant starts from ``torch._dynamo.reset()`` and, unless ``--warm-caches``, an empty
Inductor cache directory, so compile times are cold. Prints two tables and writes JSON.

    python benchmarks/pipelines.py                       # defaults: all families, ~25 min idle
    python benchmarks/pipelines.py --families dit --sizes 32,48,64 --steps 3 --repeats 1 \\
        --layers 1 --heads 2 --head-dim 8 --out /tmp/pipelines_smoke.json   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import zoo, zoo_video

# variant name -> (backend, dynamic argument of torch.compile)
VARIANTS = {
    "inductor": ("inductor", None),
    "fastcache": ("fastcache", None),
    "inductor-static": ("inductor", False),
    "fastcache-static": ("fastcache", False),
}
TIMED = ("inductor", "fastcache")  # the variants timed per image (the others: compiles only)


def schedule_rows(steps: int, calls_per_step: int, warmup: int = 2, period: int = 4) -> list[list[bool]]:
    """Forced decisions, one row per transformer call ([steps * calls_per_step, 1]; the one
    column applies to every block): full during ``warmup``, then the last step of every
    ``period`` full and the others approximated (with fastcache's default
    max_consecutive_approx = 3, the live rule cannot approximate more)."""
    rows = []
    for s in range(steps):
        approx = s >= warmup and (s - warmup) % period != period - 1
        rows += [[approx]] * calls_per_step
    return rows


@contextlib.contextmanager
def cold_inductor_cache(enabled: bool):
    """An empty Inductor cache directory (FX graphs and compiled kernels) for the block."""
    if not enabled:
        yield
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="fcfx_bench_") as d, temporary_cache_dir(d):
        yield


def _compile_seconds() -> float:
    from torch._dynamo.utils import compilation_time_metrics

    return sum(compilation_time_metrics.get("_compile.compile_inner", []))


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


#: video families: transformer calls per denoising step with CFG (zoo_video's docstring)
VIDEO_CALLS_PER_STEP = {"wan": 2, "wan22": 2, "hunyuanvideo15": 2, "ltx": 1, "cogvideox": 1}


def build(family: str, a):
    """(pipeline, run(shape), shapes, calls per step, shape label): an image family is called at
    every pixel size of ``a.sizes``; a video family (``zoo_video``) at every frame count of its
    ``VIDEO_SIZE`` (or ``a.frames``) at its largest listed size (or ``a.video_size``)."""
    if family in zoo_video.VIDEO_FAMILIES:
        frames, sizes = zoo_video.VIDEO_SIZE[family]
        frames, size = a.frames or list(frames), a.video_size or sizes[-1]
        pipe, kw = zoo_video.video_pipeline(family, steps=a.steps, num_layers=a.layers)
        return (pipe, lambda n: zoo_video.run_video_pipeline(pipe, kw, n, size), frames,
                VIDEO_CALLS_PER_STEP[family], lambda n: f"{n} frames, {size} px")
    pipe, kw = zoo.pipeline(family, num_layers=a.layers, steps=a.steps, max_size=max(a.sizes), heads=a.heads,
                            head_dim=a.head_dim)
    calls_per_step = 2 if family == "flux" else 1  # true CFG: cond and uncond calls
    return pipe, lambda size: zoo.run_pipeline(pipe, kw, size), a.sizes, calls_per_step, lambda n: f"{n} px"


def run_variant(family: str, variant: str, a) -> list[dict]:
    """One pipeline compiled as ``variant``, called at every shape (sizes, or frame counts for a
    video family) in order: one dict per shape with the compile record (and the timing for timed
    variants, at the first and the last shape)."""
    backend, dynamic = VARIANTS[variant]
    torch._dynamo.reset()
    pipe, run, shapes, calls_per_step, label = build(family, a)
    if backend == "inductor":
        pipe.transformer = torch.compile(pipe.transformer, dynamic=dynamic)
        opts = {}
    else:
        opts = {"cache_ratio_threshold": a.threshold} if a.decisions == "live" else {}
        fastcache_fx.enable_fastcache(pipe, dynamic=dynamic, **opts)
    rows = schedule_rows(a.steps, calls_per_step)

    def call(size):
        if backend == "fastcache":
            fastcache_fx.reset(pipe)
        ctx = (fastcache_fx.replay_decisions(pipe, rows, then="full")
               if backend == "fastcache" and a.decisions == "schedule" else contextlib.nullcontext())
        t0 = time.perf_counter()
        with ctx:
            run(size)
        return time.perf_counter() - t0

    out = []
    g0 = _graphs()
    timed_sizes = (shapes[0], shapes[-1])
    for size in shapes:
        c0, n0 = _compile_seconds(), _graphs()
        first = call(size)
        rec = {"family": family, "variant": variant, "size": size, "shape": label(size), "dynamic": dynamic,
               "new_graphs": _graphs() - n0, "graphs_total": _graphs() - g0,
               "compile_s": _compile_seconds() - c0, "first_call_s": first}
        if variant in TIMED and size in timed_sizes:
            call(size)  # untimed: lazy loading after a compile
            times = [call(size) for _ in range(a.repeats)]
            rec["s_per_image"] = statistics.median(times)
            rec["times_s"] = times
            if backend == "fastcache":
                st = fastcache_fx.stats(pipe)
                rec["block_approx_ratio"] = st["block_approx_ratio"]
                rec["fallback"] = st["fallback"]
                rec["fastcache_graphs"] = st["graphs"]
                rec["dynamic_graph"] = any(g["dynamic"] for g in st["per_graph"] if g["steps"])
        print(f"  {family} {variant} {rec['shape']}: +{rec['new_graphs']} graphs, compile {rec['compile_s']:.1f} s"
              + (f", {rec['s_per_image']:.3f} s/image" if "s_per_image" in rec else ""), flush=True)
        out.append(rec)
    return out


def speed_table(records: list[dict]) -> list[dict]:
    """Per family and timed size: Inductor and fastcache seconds per image and their ratio."""
    rows = []
    by = {(r["family"], r["variant"], r["size"]): r for r in records if "s_per_image" in r}
    for (fam, var, size), r in by.items():
        if var != "fastcache" or (fam, "inductor", size) not in by:
            continue
        base = by[fam, "inductor", size]["s_per_image"]
        rows.append({"family": fam, "size": size, "shape": r["shape"], "inductor_s": base, "fastcache_s": r["s_per_image"],
                     "speedup": base / r["s_per_image"], "block_approx_ratio": r["block_approx_ratio"],
                     "fallback": r["fallback"], "dynamic_graph": r["dynamic_graph"]})
    return rows


def compile_table(records: list[dict]) -> list[dict]:
    """Per family and variant: graphs compiled and compile seconds over all sizes."""
    rows = {}
    for r in records:
        k = (r["family"], r["variant"])
        row = rows.setdefault(k, {"family": r["family"], "variant": r["variant"], "graphs": 0, "compile_s": 0.0,
                                  "graphs_per_size": [], "compile_s_per_size": []})
        row["graphs"] += r["new_graphs"]
        row["compile_s"] += r["compile_s"]
        row["graphs_per_size"].append(r["new_graphs"])
        row["compile_s_per_size"].append(round(r["compile_s"], 2))
    return list(rows.values())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(zoo.FAMILIES + ("wan", "hunyuanvideo15", "ltx", "cogvideox")),
                   help=f"image: {', '.join(zoo.FAMILIES)}; video: {', '.join(zoo_video.VIDEO_FAMILIES)}")
    p.add_argument("--frames", default=None, help="video families: frame counts in call order (default: the "
                                                   "family's zoo_video.VIDEO_SIZE, e.g. 5,9)")
    p.add_argument("--video-size", type=int, default=None, help="video families: pixel size (default: the "
                                                                "largest of the family's VIDEO_SIZE)")
    p.add_argument("--variants", default="inductor,fastcache,inductor-static,fastcache-static",
                   help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--sizes", default="64,96,128", help="pixel sizes in call order (multiples of 32 suit every family); "
                                                         "speed is timed at the first and the last")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant and size (median)")
    p.add_argument("--layers", type=int, default=4, help="blocks per block list")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--decisions", choices=("schedule", "live"), default="schedule")
    p.add_argument("--threshold", type=float, default=0.05, help="cache_ratio_threshold with --decisions live")
    p.add_argument("--warm-caches", action="store_true", help="keep Inductor's on-disk caches (compile times not cold)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/pipelines.json"))
    a = p.parse_args(argv)
    a.sizes = [int(s) for s in a.sizes.split(",")]
    families = [f for f in a.families.split(",") if f]
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r} (expected of {', '.join(VARIANTS)})")
    a.frames = [int(n) for n in a.frames.split(",")] if a.frames else None
    for f in families:
        if f in zoo_video.VIDEO_FAMILIES:
            continue  # zoo_video.run_video_pipeline checks frame counts (ValueError naming them)
        bad = [s for s in a.sizes if s % zoo.PIPELINE_SIZE_MULTIPLE.get(f, 1)]
        if f not in zoo.FAMILIES or bad:
            p.error(f"--families/--sizes: {f!r} unknown or sizes {bad} not multiples of its "
                    f"{zoo.PIPELINE_SIZE_MULTIPLE.get(f)}")

    records = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for f in families:
            for v in variants:
                with cold_inductor_cache(not a.warm_caches):
                    records += run_variant(f, v, a)
    speed, compiles = speed_table(records), compile_table(records)

    width = a.heads * a.head_dim
    print(f"\n{a.layers} blocks per list, width {width} ({a.heads} x {a.head_dim}), {a.steps} steps, CFG, fp32, CPU "
          f"({torch.get_num_threads()} threads), decisions: {a.decisions}")
    print("| family | shape | inductor s/image (video) | fastcache s/image (video) | speedup | block_approx_ratio |")
    print("|---|---|---|---|---|---|")
    for r in speed:
        print(f"| {r['family']} | {r['shape']} | {r['inductor_s']:.3f} | {r['fastcache_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['block_approx_ratio']:.2f} |")
    print(f"\ncompiles over sizes {', '.join(map(str, a.sizes))} px (video: over its frame counts), in this order")
    print("| family | variant | graphs compiled (per size) | compile s (per size) |")
    print("|---|---|---|---|")
    for r in compiles:
        print(f"| {r['family']} | {r['variant']} | {r['graphs']} ({', '.join(map(str, r['graphs_per_size']))}) | "
              f"{r['compile_s']:.1f} ({', '.join(f'{x:.1f}' for x in r['compile_s_per_size'])}) |")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import diffusers

    record = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "wall_s": time.perf_counter() - t_start, "speed": speed, "compiles": compiles, "records": records}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
