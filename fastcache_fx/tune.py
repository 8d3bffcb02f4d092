"""Find the knee: sweep one quality knob on the user's own inputs, return the options that reach a
target PSNR at the highest speed.

    result = fastcache_fx.tune(transformer, lambda fn: my_trajectory(fn), target_psnr=35)
    transformer = torch.compile(transformer, backend="fastcache", options=result.options)

One uncached trajectory (plain Inductor) is the reference; each knob value is one cached
trajectory (compiled afresh, warmed up, then timed from a reset cache). PSNR compares the
cached output with the reference output: 10 log10(range^2 / MSE), range = max - min of the
reference (so images in [-1, 1] get the usual range 2). Speed is the ratio to the reference's
time in the same run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import FastCacheConfig

#: the knobs ``tune`` sweeps, with their default values (largest quality first)
KNOBS = {"cache_ratio_threshold": (0.02, 0.05, 0.1, 0.2), "error_budget": (0.05, 0.1, 0.2, 0.5, 1.0)}


@dataclass
class TunePoint:
    """One knob value: seconds of the timed trajectory, speed ratio to the reference, PSNR (dB)
    of its output against the reference output, share of block-steps approximated."""

    value: float
    seconds: float
    speedup: float
    psnr_db: float
    approx_ratio: float


@dataclass
class TuneResult:
    """The sweep: ``points`` in knob order, and ``options`` (the given options plus the chosen knob
    value: the fastest point with PSNR >= ``target_psnr``), or None when no point reaches it."""

    knob: str
    target_psnr: float
    reference_seconds: float
    points: list[TunePoint] = field(default_factory=list)
    options: dict | None = None
    chosen: TunePoint | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def psnr_db(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``metrics.psnr_db`` with the reference's own range (model outputs of any range)."""
    from .metrics import psnr_db as _psnr_db

    out, ref = output.detach().float(), reference.detach().float()
    return _psnr_db(out.reshape(1, -1) if out.dim() < 2 else out, ref.reshape(1, -1) if ref.dim() < 2 else ref,
                    data_range=None, cap=math.inf)


def fastest_run(fn, run_fn, repeats: int, reset, warmup=None) -> tuple[torch.Tensor, float]:
    """Time ``run_fn(fn)`` ``repeats`` times after one untimed warm-up (``warmup(fn)``, default
    ``run_fn(fn)``: compiles and fills the caches), calling ``reset()`` before each timed run.

    Returns (the last run's output, the fastest run's seconds)."""
    with torch.no_grad():
        (warmup or run_fn)(fn)
        best, out = math.inf, None
        for _ in range(repeats):
            reset()
            t0 = time.perf_counter()
            out = run_fn(fn)
            best = min(best, time.perf_counter() - t0)
    return out, best


def tune(model: torch.nn.Module, run_fn: Callable[[Callable], torch.Tensor], target_psnr: float, *,
         knob: str = "error_budget", values: Sequence[float] | None = None, options: dict | None = None,
         repeats: int = 1, progress: bool = True, out_json: str | Path | None = None,
         out_png: str | Path | None = None) -> TuneResult:
    """Sweep ``knob`` of the fastcache backend on ``run_fn`` and pick the options for a target PSNR.

    Args:
        model: the transformer (an ``nn.Module``); it is compiled once per knob value.
        run_fn: ``run_fn(fn) -> tensor``: one whole trajectory calling ``fn`` (the compiled
            transformer) as the pipeline would, with fixed seeds; returns the output to compare
            (latents or images).
        target_psnr: PSNR in dB (vs the uncached trajectory) the chosen options must reach.
        knob: "cache_ratio_threshold" (``decision="chi2"``) or "error_budget" (``decision="output"``
            unless ``options`` give "error").
        values: knob values to try (default ``KNOBS[knob]``).
        options: other FastCacheConfig fields, kept fixed.
        repeats: timed trajectories per point (the fastest counts).
        out_json, out_png: where to write the result and the speed / PSNR plot.

    Returns:
        TuneResult (``options`` None when no value reaches the target: say so, never guess).

    Raises:
        ValueError: ``target_psnr`` not a finite number > 0, an unknown ``knob``, empty or
            non-positive ``values``, ``repeats`` < 1, or a bad option (named).
    """
    from tqdm.auto import tqdm

    from .api import reset, stats
    from .backend import FastCacheBackend
    from .runtime import registry

    if isinstance(target_psnr, bool) or not isinstance(target_psnr, (int, float)) or not math.isfinite(target_psnr) \
            or target_psnr <= 0:
        raise ValueError(f"target_psnr: expected a finite number of dB > 0, got {target_psnr!r}")
    if knob not in KNOBS:
        raise ValueError(f"knob: expected one of {sorted(KNOBS)}, got {knob!r}")
    values = list(KNOBS[knob] if values is None else values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values):
        raise ValueError(f"values: expected positive numbers, got {values!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")
    base = dict(options or {})
    if knob == "error_budget":
        base.setdefault("decision", "output")
    FastCacheConfig.from_options(base)  # a bad option fails here, before any compile

    torch.compiler.reset()
    ref, ref_s = fastest_run(torch.compile(model, backend="inductor"), run_fn, repeats, lambda: None)
    result = TuneResult(knob, float(target_psnr), ref_s)
    for v in tqdm(values, desc=f"tune {knob}", disable=not progress):
        torch.compiler.reset()
        entry = registry.lookup(model)
        if entry is not None:
            entry.graphs.clear()  # the previous value's graphs: stats() describe this one only
        fn = torch.compile(model, backend=FastCacheBackend(**{**base, knob: v}))
        out, secs = fastest_run(fn, run_fn, repeats, lambda: reset(model))
        st = stats(model)
        result.points.append(TunePoint(float(v), secs, ref_s / secs, psnr_db(out, ref), st["block_approx_ratio"]))
    ok = [p for p in result.points if p.psnr_db >= target_psnr]
    if ok:
        result.chosen = min(ok, key=lambda p: p.seconds)
        result.options = {**base, knob: result.chosen.value}
    torch.compiler.reset()
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if out_png is not None:
        plot(result, out_png)
    return result


def plot(result: TuneResult, path: str | Path) -> None:
    """Speedup vs PSNR of each knob value, the target as a vertical line, the chosen point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [min(p.psnr_db, 99.0) for p in result.points]
    ys = [p.speedup for p in result.points]
    ax.plot(xs, ys, "o-", color="C0", label=f"fastcache, {result.knob}")
    for p, x, y in zip(result.points, xs, ys):
        ax.annotate(f"{p.value:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(result.target_psnr, color="C3", ls="--", label=f"target {result.target_psnr:g} dB")
    if result.chosen is not None:
        ax.plot([min(result.chosen.psnr_db, 99.0)], [result.chosen.speedup], "o", ms=14, mfc="none", color="C3")
    ax.set_xlabel("PSNR vs uncached (dB)")
    ax.set_ylabel("speedup vs Inductor")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: TuneResult) -> str:
    """The sweep as a markdown table."""
    lines = [f"| {result.knob} | seconds | speedup | PSNR (dB) | approximated |", "|---|---|---|---|---|",
             f"| (Inductor, reference) | {result.reference_seconds:.3f} | 1.00x | inf | 0.00 |"]
    for p in result.points:
        mark = " (chosen)" if p is result.chosen else ""
        lines.append(f"| {p.value:g}{mark} | {p.seconds:.3f} | {p.speedup:.2f}x | {p.psnr_db:.1f} | {p.approx_ratio:.2f} |")
    return "\n".join(lines)


# the ``fastcache-fx tune`` command ---------------------------------------------------------

def add_arguments(p) -> None:
    p.add_argument("--model", default="dit", help="bundled reference model: dit or mmdit")
    p.add_argument("--target-psnr", type=float, required=True, help="dB against the uncached trajectory")
    p.add_argument("--knob", default="error_budget", choices=sorted(KNOBS))
    p.add_argument("--values", default=None, help="comma-separated knob values (default: a built-in sweep)")
    p.add_argument("--samples", type=int, default=8, help="images per trajectory (classes 0.. in turn)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out-json", default="tune.json")
    p.add_argument("--out-png", default="tune.png")
    p.add_argument("--no-progress", action="store_true")


def run(a) -> int:
    from .reference.jobs import job

    j = job(a.model)
    if a.samples < 1:
        raise ValueError("--samples: must be >= 1")
    values = [float(v) for v in a.values.split(",")] if a.values else None
    labels = torch.arange(a.samples) % 10
    seeds = [1000 + i for i in range(a.samples)]

    def run_fn(fn):
        return j.sample(fn, labels, steps=a.steps, seeds=seeds)

    res = tune(j.load(), run_fn, a.target_psnr, knob=a.knob, values=values,
               options={"timestep_max": j.timestep_max}, repeats=a.repeats, progress=not a.no_progress,
               out_json=a.out_json, out_png=a.out_png)
    print(format_table(res))
    if res.options is None:
        print(f"no {a.knob} value reached {a.target_psnr:g} dB; try smaller values")
        return 1
    print(f"options: {res.options}")
    print(f"wrote {a.out_json}, {a.out_png}")
    return 0
