"""Does ``target_psnr`` hold on the final sample? The matrix of issue 37.

For each bundled model x sampler x guidance scale x CFG mode (batched / separate calls where the
sampler allows) x step count (long / short) x cache level (block / the fast step level), samples
once with every block computed (the eager model: the reference) and then, on ONE compiled graph
per (model, level, batch shape), for each target T (dB) with

- ``aware``: ``enable_fastcache(..., target_psnr=T)`` as shipped (the sampler-aware per-step
  budget, ``runtime.quality``);
- ``calibrated``: the same after ``calibrate_target`` on generations of other seeds (1 full + up
  to 3 cached generations);
- ``fixed``: the same target through the fixed relation ``config.budget_for_psnr`` alone (what a
  bare backend does, and what main did before issue 37).

Prints one row per cell (target, measured final-sample PSNR, approximated share of block-steps)
and a summary per target (worst cell, median, cells below T - 1 dB); writes JSON.
PSNR only: no timing (``reference.metrics.psnr_db``: data range 2, mean over samples, cap 100).

    python benchmarks/quality_target.py --quick            # the session loop subset (~10 min)
    python benchmarks/quality_target.py --models dit dit_cosine --modes fixed aware calibrated
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx.reference.metrics import psnr_db

HERE = Path(__file__).resolve().parent

#: the fast setting of RESULTS.md (step level, span forecast)
LEVELS = {"block": {}, "step": dict(cache_level="step", front_blocks=0, approx="taylor", taylor_order=2,
                                    max_consecutive_approx=8)}
DIT_MODELS = ("dit", "dit_unseen", "dit_cosine")


def _dit_scheduler_config(name: str, sampler: str) -> dict:
    from fastcache_fx.reference.model import scheduler_config

    cfg = dict(scheduler_config(name=name))
    if sampler != "ddim":
        cfg.pop("clip_sample", None)
    if sampler in ("dpmsolver", "unipc") and cfg.get("beta_schedule") == "squaredcos_cap_v2":
        cfg["timestep_spacing"] = "leading"  # "linspace" starts at t = 999 and diverges on this schedule
    return cfg


#: model -> (samplers: own first, guidance scales, CFG modes, long steps)
SETTINGS = {
    "dit": (("ddim", "dpmsolver"), (2.0, 4.0), ("batched", "separate"), 50),
    "dit_unseen": (("ddim", "dpmsolver"), (3.0, 1.5), ("batched", "separate"), 50),
    "dit_cosine": (("ddim", "dpmsolver"), (3.0, 1.5), ("batched", "separate"), 50),
    "mmdit": (("flow_euler", "unipc"), (3.0, 5.0), ("batched",), 28),
    "wan": (("unipc", "flow_euler"), (4.0, 2.0), ("separate",), 30),
}
SHORT_STEPS = 10
#: the samples every row is measured on; a calibration generates others (CALIBRATION_SEED)
EVAL_SEED, CALIBRATION_SEED = 1000, 0
MODES = ("aware", "calibrated", "fixed")


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


class Model:
    """One model's eager reference and its compiled fastcache versions (per level)."""

    def __init__(self, name: str, batch: int) -> None:
        from fastcache_fx.reference.jobs import job

        self.name, self.batch = name, batch
        self.dit = name in DIT_MODELS
        self.job = None if name == "dit_cosine" else job(name)
        self.eager = self._load()
        self.fast: dict[str, object] = {}

    def _load(self):
        if self.dit:
            from fastcache_fx.reference.model import load

            return load(name=self.name)
        return self.job.load()

    def _scheduler(self, sampler: str):
        if self.name == "mmdit":
            from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

            from fastcache_fx.reference.mmdit import flow_scheduler_config

            cfg = flow_scheduler_config()
            if sampler == "flow_euler":
                return FlowMatchEulerDiscreteScheduler.from_config(cfg)
            return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                           flow_shift=float(cfg.get("shift", 1.0)))
        if self.name == "wan":
            from diffusers import FlowMatchEulerDiscreteScheduler

            from fastcache_fx.reference.wan_sampling import make_wan_scheduler

            s = make_wan_scheduler()
            if sampler == "unipc":
                return s
            return FlowMatchEulerDiscreteScheduler(shift=float(s.config.get("flow_shift", 1.0)))
        return None

    def pipe(self, transformer):
        if self.name == "mmdit":
            from fastcache_fx.reference.mmdit_sampling import build_pipeline

            return build_pipeline(transformer)
        from fastcache_fx.reference.wan_sampling import build_wan_pipeline

        return build_wan_pipeline(transformer)

    def compiled(self, level: str, target: float):
        """The fastcache version at ``level`` (compiled once; later targets only retarget)."""
        if level not in self.fast:
            model = self._load()
            opts = dict(LEVELS[level], target_psnr=target)
            if self.dit:
                self.fast[level] = fastcache_fx.enable_fastcache(model, dynamic=False, **opts)
            else:
                self.fast[level] = fastcache_fx.enable_fastcache(self.pipe(model), dynamic=False, **opts)
        return self.fast[level]

    def sample(self, runner, sampler: str, guidance: float, cfg: str, steps: int, seed: int = EVAL_SEED) -> torch.Tensor:
        labels = (_labels(self.batch) + seed) % 10
        if self.dit:
            from fastcache_fx.reference.sampling import sample

            size = 16 if self.name == "dit_cosine" else 8
            return sample(runner, labels, num_inference_steps=steps, guidance_scale=guidance, scheduler=sampler,
                          seed=seed, scheduler_config=_dit_scheduler_config(self.name, sampler), image_size=size,
                          cfg=cfg)
        pipe = runner if not isinstance(runner, torch.nn.Module) else self.pipe(runner)
        pipe.scheduler = self._scheduler(sampler)
        if self.name == "mmdit":
            from fastcache_fx.reference.jobs import _embedder
            from fastcache_fx.reference.mmdit_sampling import sample_mmdit

            return sample_mmdit(pipe, _embedder(), labels, num_inference_steps=steps, guidance_scale=guidance,
                                seed=seed)
        from fastcache_fx.reference.jobs import _wan_embedder, wan_motions
        from fastcache_fx.reference.wan_sampling import sample_wan

        return sample_wan(pipe, _wan_embedder(), labels, wan_motions(len(labels)), num_inference_steps=steps,
                          guidance_scale=guidance, seed=seed)


def cells(models, quick: bool):
    """(model, sampler, guidance, cfg, steps) of the matrix (``quick``: a subset)."""
    for m in models:
        samplers, gs, cfgs, long_steps = SETTINGS[m]
        if quick:  # own sampler at both step counts + the other sampler short; first guidance; first CFG mode
            yield (m, samplers[0], gs[0], cfgs[0], long_steps)
            yield (m, samplers[0], gs[0], cfgs[0], SHORT_STEPS)
            yield (m, samplers[1], gs[1], cfgs[-1], SHORT_STEPS)
            continue
        for s, g, c, n in itertools.product(samplers, gs, cfgs, (long_steps, SHORT_STEPS)):
            yield (m, s, g, c, n)


def predicted_sums(step_errors: list) -> dict:
    """A trajectory's predicted final error without the weight's factor (units of the allowed
    error; ``stats()["quality"]["step_errors"]``: (step, context, e / factor)), summed linearly
    and in quadrature: the measured / predicted ratio of each fits ``UNCALIBRATED_SCALE``
    (docs/quality.md)."""
    es = [e for _, _, e in step_errors]
    return {"steps_approximated": len({k for k, _, _ in step_errors}), "predicted_linear": round(sum(es), 4),
            "predicted_quadrature": round(sum(e * e for e in es) ** 0.5, 4)}


def run(args) -> dict:
    rows = []
    t0 = time.time()
    for name in args.models:
        # the models share classes (three DiTs): Dynamo's recompile limit would leave a later one uncompiled
        torch._dynamo.reset()
        model = Model(name, args.batch)
        for (m, sampler, g, cfg, steps) in cells([name], args.quick):
            with torch.no_grad():
                ref = model.sample(model.eager, sampler, g, cfg, steps)
            for level in args.levels:
                for mode in args.modes:
                    for target in args.targets:
                        runner = model.compiled(level, target)
                        fastcache_fx.set_target_psnr(runner, target, sampler_aware=mode != "fixed")
                        cal = None
                        if mode == "calibrated":
                            with torch.no_grad():
                                cal = fastcache_fx.calibrate_target(
                                    runner, lambda: model.sample(runner, sampler, g, cfg, steps, CALIBRATION_SEED))
                        fastcache_fx.reset(runner)
                        with torch.no_grad():
                            out = model.sample(runner, sampler, g, cfg, steps)
                        st = fastcache_fx.stats(runner if model.dit else runner.transformer)
                        p = psnr_db(out, ref)
                        q = st.get("quality") or {}
                        row = dict(model=m, sampler=sampler, guidance=g, cfg=cfg, steps=steps, level=level, mode=mode,
                                   target=target, psnr=round(p, 2), approx=round(st["block_approx_ratio"], 3),
                                   predicted_final_error=q.get("predicted_final_error"),
                                   calibration=cal, calibration_used=(q.get("calibration") or {}).get("scale"),
                                   **predicted_sums(q.get("step_errors") or []))
                        rows.append(row)
                        print(f"{m:10s} {sampler:10s} g={g:<4} {cfg:8s} {steps:3d} steps {level:5s} {mode:5s} "
                              f"T={target:4.1f}  PSNR {p:6.2f}  approx {row['approx']:.2f}"
                              f"{'  MISS' if p < target - 1 else ''}  [{time.time() - t0:.0f}s]", flush=True)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per (mode, level, target): cells, worst PSNR, median, cells below T - 1, median approximated share."""
    out = {}
    for key in sorted({(r["mode"], r["level"], r["target"]) for r in rows}):
        rs = [r for r in rows if (r["mode"], r["level"], r["target"]) == key]
        ps = [r["psnr"] for r in rs]
        worst = min(rs, key=lambda r: r["psnr"])
        out["%s/%s/%g" % key] = {
            "cells": len(rs), "worst": min(ps), "median": statistics.median(ps),
            "misses": sum(p < key[2] - 1 for p in ps), "median_approx": statistics.median(r["approx"] for r in rs),
            "worst_cell": {k: worst[k] for k in ("model", "sampler", "guidance", "cfg", "steps")}}
    return out


#: the matrix's factors: a row's key for each
FACTORS = {"model": lambda r: r["model"], "sampler": lambda r: r["sampler"], "CFG mode": lambda r: r["cfg"],
           "guidance": lambda r: "high" if r["guidance"] == max(SETTINGS[r["model"]][1]) else "low",
           "steps": lambda r: "short" if r["steps"] == SHORT_STEPS else "long", "level": lambda r: r["level"],
           "target": lambda r: f"T={r['target']:g}"}


def factors(rows: list[dict]) -> list[str]:
    """Which factor moves the final PSNR: per factor and value (over every other factor), the
    median of PSNR - T (dB; a cell that approximated nothing counts at its 100 dB cap: left out),
    the lowest PSNR - T and the median approximated share (markdown table lines)."""
    out = ["| factor | value | cells | median PSNR - T | lowest PSNR - T | median approximated |",
           "|---|---|---|---|---|---|"]
    for name, key in FACTORS.items():
        for value in sorted({key(r) for r in rows}):
            rs = [r for r in rows if key(r) == value]
            d = [r["psnr"] - r["target"] for r in rs if r["approx"] > 0]
            if not d:
                continue
            out.append(f"| {name} | {value} | {len(rs)} | {statistics.median(d):+.1f} | {min(d):+.1f} | "
                       f"{statistics.median(r['approx'] for r in rs):.2f} |")
    return out + [""]


def markdown(res: dict) -> str:
    """The matrix as markdown: per (level, mode) one table of cells x targets, "PSNR (approximated
    share)" with misses (below T - 1 dB) in bold, then the summary per target."""
    rows, out = res["rows"], []
    targets = sorted({r["target"] for r in rows})
    for level, mode in sorted({(r["level"], r["mode"]) for r in rows}):
        out += [f"**{level} level, {mode}**", "",
                "| model | sampler | CFG | steps | " + " | ".join(f"T={t:g}" for t in targets) + " |",
                "|---|---|---|---|" + "---|" * len(targets)]
        cells = sorted({(r["model"], r["sampler"], r["guidance"], r["cfg"], r["steps"]) for r in rows
                        if (r["level"], r["mode"]) == (level, mode)}, key=lambda c: (c[0], c[1], c[2], c[3], -c[4]))
        for c in cells:
            got = {r["target"]: r for r in rows if (r["level"], r["mode"]) == (level, mode)
                   and (r["model"], r["sampler"], r["guidance"], r["cfg"], r["steps"]) == c}
            vals = []
            for t in targets:
                r = got.get(t)
                p = "-" if r is None else (f"**{r['psnr']:.1f}**" if r["psnr"] < t - 1 else f"{r['psnr']:.1f}")
                vals.append(p if r is None else f"{p} ({r['approx']:.2f})")
            out.append(f"| {c[0]} | {c[1]} | {c[3]} {c[2]:g} | {c[4]} | " + " | ".join(vals) + " |")
        out.append("")
    out += factors(rows)
    out += ["| level / mode / T | cells | worst | median | cells < T - 1 | median approximated | worst cell |",
            "|---|---|---|---|---|---|---|"]
    for k, v in res["summary"].items():
        mode, level, t = k.split("/")
        w = v["worst_cell"]
        out.append(f"| {level} / {mode} / {t} | {v['cells']} | {v['worst']:.1f} | {v['median']:.1f} | {v['misses']} | "
                   f"{v['median_approx']:.2f} | {w['model']}, {w['sampler']} {w['steps']}, "
                   f"CFG {w['guidance']:g} {w['cfg']} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "dit_unseen", "mmdit", "wan", "dit_cosine"])
    p.add_argument("--levels", nargs="+", default=["block", "step"], choices=list(LEVELS))
    p.add_argument("--targets", nargs="+", type=float, default=[30.0, 35.0, 40.0])
    p.add_argument("--batch", type=int, default=8, help="samples per generation")
    p.add_argument("--quick", action="store_true", help="3 cells per model (see cells())")
    p.add_argument("--modes", nargs="+", default=["aware", "calibrated"], choices=MODES,
                   help="aware: sampler-aware weight; calibrated: + calibrate_target on other seeds; fixed: the "
                        "fixed relation (main before issue 37)")
    p.add_argument("--out", type=Path, default=HERE / "quality_target.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables (markdown) here")
    p.add_argument("--render", type=Path, default=None, help="only print the tables of this JSON (no run)")
    a = p.parse_args(argv)
    if a.render is not None:
        print(markdown(json.loads(a.render.read_text())))
        return
    torch.manual_seed(0)
    res = run(a)
    print()
    for k, v in res["summary"].items():
        print(f"{k:22s} cells {v['cells']:3d}  worst {v['worst']:6.2f}  median {v['median']:6.2f}  "
              f"misses(<T-1) {v['misses']:3d}  median approx {v['median_approx']:.2f}  worst at {v['worst_cell']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res.update(date=datetime.date.today().isoformat(), commit=commit, argv=sys.argv[1:], torch=torch.__version__,
               note="PSNR of the final samples against the eager model computing every block, same seeds")
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.markdown is not None:
        a.markdown.write_text(markdown(res))
        print(f"wrote {a.markdown}")


if __name__ == "__main__":
    main()
