"""fastcache against its peers: one harness, one run, one results page.

Suite 1 (quality and speed, bundled reference DiT): the same labels, seeds, scheduler and steps for
every method; eager and plain ``torch.compile`` (Inductor) baselines, ``backend="fastcache"`` at
several thresholds, and the peers of ``peers.py`` applied as their docs say (compiled with Inductor
where that works, eager otherwise; the table says which). Columns: seconds per image (timed
trajectory, compile and warm-up excluded), speedup vs Inductor, PSNR / SSIM of each image against
the Inductor image of the same seed, class accuracy, digits-FID.

Suite 2 (speed at scale, random weights): DiT-XL/2 at 256 px and PixArt-Sigma at 512 px compiled by
Inductor and by fastcache; fastcache replays the decision traces recorded in suite 1
(``fastcache_fx.replay_decisions``), so the measured latency is that of the same approximated
(block, step) pattern; live decisions on random weights would mean nothing.

Writes ``compare.json``, ``compare.png`` (speedup vs PSNR) and the ``compare`` section of
``RESULTS.md`` (between its markers). Run ``python benchmarks/compare.py --help``.

``--model mmdit`` runs suite 1 on the bundled flow-matching MMDiT instead (``SD3Transformer2DModel``,
28 Euler steps of the real ``StableDiffusion3Pipeline``, batched CFG [uncond, cond]; fastcache via
``enable_fastcache(pipe)``; class accuracy / digits-FID on 2x2-pooled 8x8 images) and writes
``compare_mmdit.json``, ``compare_mmdit.png`` and the ``compare_mmdit`` section. The peers are
applied to the SD3 model as to the DiT (in diffusers 0.42.1 ``SD3Transformer2DModel`` lacks
CacheMixin too: the public ``apply_*`` functions); their per-call hooks wrap the transformer the
pipeline calls, without the DiT's CFG-half swap (the SD3 pipeline already batches [uncond, cond]).
A peer that fails on SD3 is a row with its error (diffusers' FirstBlockCache subtracts the
``None`` encoder output of SD3's last, ``context_pre_only`` block). Suite 2 replays DiT traces and
is DiT-only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

import numpy as np
import torch

from fastcache_fx.reference.metrics import PSNR_CAP  # dB reported for identical images

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers as P  # noqa: E402

import fastcache_fx  # noqa: E402
from fastcache_fx.demo import last_trajectory  # noqa: E402
from fastcache_fx.runtime.stats import block_share  # noqa: E402
from fastcache_fx.reference.jobs import MODELS, job  # noqa: E402

HERE = Path(__file__).resolve().parent
BASELINES = ("eager", "inductor")
#: fastcache rows: the options each variant sets besides its swept knob
FASTCACHE_VARIANTS = {
    "fastcache": {"decision": "chi2"},  # the paper's rule
    "fastcache_taylor": {"approx": "taylor", "decision": "chi2"},
    "fastcache_taylor2": {"approx": "taylor", "taylor_order": 2, "decision": "chi2"},
    "fastcache_error": {"decision": "error"},
    "fastcache_taylor_error": {"approx": "taylor", "decision": "error"},
    "fastcache_error_mc6": {"decision": "error", "max_consecutive_approx": 6},  # above the 0.72 share cap
    "fastcache_output": {"decision": "output"},  # the default rule: the budget on the output error
    "fastcache_output_mc6": {"decision": "output", "max_consecutive_approx": 6},
    # the hierarchical levels (passes/spans.py): one decision per step / per span
    "fastcache_step": {"decision": "output", "cache_level": "step"},
    "fastcache_step_mc8": {"decision": "output", "cache_level": "step", "max_consecutive_approx": 8},
    "fastcache_step_taylor": {"decision": "output", "cache_level": "step", "approx": "taylor"},
    "fastcache_step_taylor_mc8": {"decision": "output", "cache_level": "step", "approx": "taylor",
                                  "max_consecutive_approx": 8},
    "fastcache_step_taylor2": {"decision": "output", "cache_level": "step", "approx": "taylor", "taylor_order": 2},
    "fastcache_step_taylor_bf16": {"decision": "output", "cache_level": "step", "approx": "taylor",
                                   "state_dtype": "bfloat16"},
    "fastcache_output_bf16": {"decision": "output", "state_dtype": "bfloat16"},
    "fastcache_span": {"decision": "output", "cache_level": "span"},
    # no front block: the whole stack is one span, decided on the change of its input (TeaCache-like)
    "fastcache_step0_taylor2_mc8": {"decision": "output", "cache_level": "step", "front_blocks": 0, "approx": "taylor",
                                    "taylor_order": 2, "max_consecutive_approx": 8},
    "fastcache_step_taylor2_mc8": {"decision": "output", "cache_level": "step", "approx": "taylor",
                                   "taylor_order": 2, "max_consecutive_approx": 8},
    # set only by target_psnr (enable_fastcache: the sampler-aware budget, docs/quality.md)
    "fastcache_target": {},
    "fastcache_step_target": {"cache_level": "step", "front_blocks": 0, "approx": "taylor", "taylor_order": 2,
                              "max_consecutive_approx": 8},
    # never approximating: the rewritten graph's own cost (decisions, error sums, state) per call
    "fastcache_off": {"decision": "output", "enable_block_approx": False},
    "fastcache_step_off": {"decision": "output", "cache_level": "step", "approx": "taylor",
                           "enable_block_approx": False},
}
FASTCACHE_LABELS = {"fastcache": "fastcache chi2", "fastcache_taylor": "fastcache taylor-1 chi2",
                    "fastcache_taylor2": "fastcache taylor-2 chi2", "fastcache_error": "fastcache error rule",
                    "fastcache_taylor_error": "fastcache taylor-1 + error rule",
                    "fastcache_error_mc6": "fastcache error rule, max_consecutive_approx=6",
                    "fastcache_output": "fastcache output budget (default rule)",
                    "fastcache_output_mc6": "fastcache output budget, max_consecutive_approx=6",
                    "fastcache_step": "fastcache step level",
                    "fastcache_step_mc8": "fastcache step level, max_consecutive_approx=8",
                    "fastcache_step_taylor": "fastcache step level + span Taylor forecast",
                    "fastcache_step_taylor_mc8": "fastcache step level + span Taylor, max_consecutive_approx=8",
                    "fastcache_step_taylor2": "fastcache step level + span Taylor-2 forecast",
                    "fastcache_step_taylor_bf16": "fastcache step level + span Taylor, bfloat16 state",
                    "fastcache_output_bf16": "fastcache output budget, bfloat16 state",
                    "fastcache_span": "fastcache span level (2 spans)",
                    "fastcache_step0_taylor2_mc8": "fastcache step level, no front block, span Taylor-2, "
                                                   "max_consecutive_approx=8",
                    "fastcache_step_taylor2_mc8": "fastcache step level + span Taylor-2, max_consecutive_approx=8",
                    "fastcache_target": "fastcache target_psnr (no other option)",
                    "fastcache_step_target": "fastcache target_psnr, step level, no front block, span Taylor-2",
                    "fastcache_off": "fastcache block level, never approximating",
                    "fastcache_step_off": "fastcache step level + span Taylor, never approximating"}
METHODS = BASELINES + tuple(FASTCACHE_VARIANTS) + P.PEERS
DEFAULT_METHODS = ",".join(METHODS)

#: The knob each method is swept over, and its default values (a flag per method overrides them).
SWEEPS = {
    "fastcache": ("cache_ratio_threshold", "0.02,0.05,0.1,0.2"),
    "fastcache_taylor": ("cache_ratio_threshold", "0.05,0.1,0.2,0.3"),
    "fastcache_taylor2": ("cache_ratio_threshold", "0.05,0.1,0.2,0.3"),
    "fastcache_error": ("error_budget", "0.01,0.02,0.05,0.1"),
    "fastcache_taylor_error": ("error_budget", "0.01,0.02,0.05,0.1"),
    "fastcache_error_mc6": ("error_budget", "0.05,0.1,0.2"),
    "fastcache_output": ("error_budget", "0.1,0.2,0.5,1.0"),
    "fastcache_output_mc6": ("error_budget", "0.5,1.0,2.0"),
    "fastcache_step": ("error_budget", "0.1,0.25,0.5,1.0"),
    "fastcache_step_mc8": ("error_budget", "0.5,1.0,2.0"),
    "fastcache_step_taylor": ("error_budget", "0.1,0.25,0.5,1.0"),
    "fastcache_step_taylor_mc8": ("error_budget", "0.5,1.0,2.0"),
    "fastcache_step_taylor2": ("error_budget", "0.25,0.5,1.0"),
    "fastcache_step_taylor_bf16": ("error_budget", "0.25,0.5,1.0"),
    "fastcache_output_bf16": ("error_budget", "0.5"),
    "fastcache_span": ("error_budget", "0.25,0.5,1.0"),
    "fastcache_step0_taylor2_mc8": ("error_budget", "1.0,2.0,4.0"),
    "fastcache_step_taylor2_mc8": ("error_budget", "1.0,2.0,4.0"),
    "fastcache_target": ("target_psnr", "30,35,40"),
    "fastcache_step_target": ("target_psnr", "30,35,40"),
    "fastcache_off": ("error_budget", "0.5"),
    "fastcache_step_off": ("error_budget", "0.5"),
    "fbcache": ("threshold", "0.05,0.1,0.2"),
    "taylorseer": ("cache_interval", "3,5"),
    "magcache": ("threshold", "0.06,0.12"),
    "fastercache": ("skip_range", "2"),
    "pab": ("skip_range", "2"),
    "dbcache": ("threshold", "0.12,0.24"),
    "dbcache_taylorseer": ("threshold", "0.12,0.24"),
}
_PEER_KEYS = {"threshold": "threshold", "cache_interval": "cache_interval", "skip_range": "skip_range"}


# ----------------------------------------------------------------------------- metrics


def psnr_db(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of PSNR = 10 log10(R^2 / MSE) in dB, R = 2 (images in [-1, 1]), each
    image [1, H, W] against the reference of the same seed; identical images count as ``PSNR_CAP``."""
    from fastcache_fx import reference as R

    return R.psnr_db(images, reference)


def ssim_mean(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13; 7x7 uniform window as scikit-image) over images."""
    from fastcache_fx import reference as R

    return float(R.ssim(images, reference).mean())


# ----------------------------------------------------------------------------- suite 1


def _parse_list(text: str, cast=float) -> list:
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list, got {text!r}") from None


def plan(methods: list[str], sweeps: dict[str, list]) -> list[dict]:
    """The rows to run: one per baseline, one per (method, swept value)."""
    rows = []
    for m in methods:
        if m in BASELINES:
            rows.append({"method": m, "param": None, "value": None})
        else:
            knob = SWEEPS[m][0]
            rows += [{"method": m, "param": knob, "value": v} for v in sweeps[m]]
    return rows


class Suite1:
    """Suite 1 runner: shared labels, seeds and reference images; one row at a time."""

    def __init__(self, a) -> None:
        from fastcache_fx import reference as R

        self.a, self.R = a, R
        self.job = job(a.model)
        self.labels = torch.arange(a.samples) % 10
        self.seeds = [1000 + i for i in range(a.samples)]
        self.clf = R.load_classifier()
        self.reference = None  # Inductor images, the PSNR/SSIM reference
        self.inductor_s = None

    def sample(self, fn, steps=None, progress=None):
        a = self.a
        return self.job.sample(fn, self.labels, steps=steps or a.steps, guidance=a.guidance, seeds=self.seeds,
                               progress=(not a.no_progress) if progress is None else progress)

    def peer_callee(self, applied, callee):
        """What the sampler calls for a peer: the DiT wrapper of ``peers.py``, or for the MMDiT a
        module the SD3 pipeline can hold (``_PeerTransformer``)."""
        if self.job.pipeline:
            return _PeerTransformer(applied, callee, applied.module)
        return applied.wrap_forward(callee)

    def _time(self, fn, reset) -> tuple[torch.Tensor, float, float]:
        """(images, warm-up seconds incl. compile, timed-trajectory seconds).

        The warm-up is one whole untimed trajectory, so that every graph a method may need (a peer's
        cache-hit and cache-miss paths, recompiles on Python state) is compiled before timing; then
        ``--repeats`` timed trajectories from a reset state, the fastest one counted."""
        t0 = time.perf_counter()
        self.sample(fn, progress=False)
        warm = time.perf_counter() - t0
        best, imgs = math.inf, None
        for _ in range(self.a.repeats):
            reset()
            t0 = time.perf_counter()
            imgs = self.sample(fn)
            best = min(best, time.perf_counter() - t0)
        return imgs, warm, best

    def run_row(self, row: dict) -> dict:
        """Run one planned row; returns it filled (status "ok", "n/a" with a reason, or "error")."""
        import fastcache_fx

        a, R = self.a, self.R
        m = row["method"]
        out = dict(row, label=_label(row), compiled=False, note="", status="ok")
        torch._dynamo.reset()
        model = self.job.load()
        trace = None
        try:
            if m == "eager":
                imgs, warm, secs = self._time(model, lambda: None)
            elif m == "inductor":
                fn = self.job.inductor(model)
                out["compiled"] = True
                imgs, warm, secs = self._time(fn, lambda: None)
            elif m in FASTCACHE_VARIANTS:
                opts = {**FASTCACHE_VARIANTS[m], row["param"]: row["value"]}
                fn = self.job.fastcache(model, opts)
                out["compiled"] = True
                out["options"] = opts
                out["note"] = f"backend='fastcache', options {FASTCACHE_VARIANTS[m] or '(defaults)'} besides the knob" + \
                    (" (enable_fastcache(pipe))" if self.job.pipeline else "")
                imgs, warm, secs = self._time(fn, lambda: fastcache_fx.reset(model))
                st = fastcache_fx.stats(model)
                timed = last_trajectory(st, a.steps)
                trace = [[bool(x) for x in s["approx"]] for s in timed]
                out["approx_ratio"] = block_share(timed)  # in blocks: a span counts its depth
            else:
                imgs, warm, secs = self._run_peer(model, row, out)
        except P.PeerNotApplicable as e:
            out.update(status="n/a", reason=str(e))
            return out
        except Exception as e:  # a peer that breaks at run time is a result, not a crash of the harness
            out.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            return out
        n = len(self.labels)
        out.update(warmup_s=warm, seconds_per_image=secs / n, trajectory_s=secs)
        if m == "inductor":
            self.reference, self.inductor_s = imgs, secs
        small = self.job.to_classifier(imgs)  # 8x8 (MMDiT: 2x2 average pooling; Wan: per frame)
        out["class_accuracy"] = R.class_accuracy(self.clf, small, self.job.classifier_labels(self.labels))
        if self.job.frames > 1:
            out["temporal_psnr_db"] = self.job.temporal_psnr(imgs)
        out["digits_fid"] = R.digits_fid(self.clf, small)
        if self.reference is not None:
            out["psnr_db"] = psnr_db(imgs, self.reference)
            out["ssim"] = ssim_mean(self.job.as_images(imgs), self.job.as_images(self.reference))
            out["speedup"] = self.inductor_s / secs
        if trace is not None:
            out["trace"] = trace
        return out

    def _run_peer(self, model, row, out):
        a = self.a
        m = row["method"]
        params = {_PEER_KEYS[row["param"]]: row["value"]} if row["param"] else {}
        calib = (lambda h: self.sample(self.peer_callee(h, h.module), progress=False)) if m == "magcache" else None
        applied = P.apply_peer(m, model, steps=a.steps, params=params, calibrate_fn=calib)
        out["note"] = applied.note
        if applied.info:
            out["peer_info"] = applied.info
        if a.peer_mode == "compiled" and m in P.COMPILABLE:
            fn = self.peer_callee(applied, torch.compile(model, backend="inductor", dynamic=False))
            try:
                imgs, warm, secs = self._time(fn, applied.reset)
                out["compiled"] = True
            except Exception as e:  # the peer does not survive torch.compile: run it eager, say so
                torch._dynamo.reset()
                applied.reset()
                out["note"] += f"; torch.compile failed ({type(e).__name__}), run eager"
                imgs, warm, secs = self._time(self.peer_callee(applied, model), applied.reset)
        else:
            if a.peer_mode == "compiled":
                out["note"] += "; eager: " + P.COMPILABLE_WHY[m]
            imgs, warm, secs = self._time(self.peer_callee(applied, model), applied.reset)
        s = P.summary(applied, m)
        if s.get("cached_steps") is not None:
            out["approx_ratio"] = len(s["cached_steps"]) / a.steps  # whole steps served from the cache
        return imgs, warm, secs


class _PeerTransformer(torch.nn.Module):
    """A peer-hooked SD3 transformer as ``StableDiffusion3Pipeline`` holds it: ``forward(**kw)``
    runs the peer's per-call hooks (``pre_call(timestep)``, its cache context) around ``callee``
    (the module or its compiled version); ``config``, ``device`` and ``dtype`` are the model's.
    The SD3 pipeline batches CFG as [uncond, cond], the order FasterCache assumes: no swap.
    ``WanPipeline`` calls cond and uncond separately, each under ``transformer.cache_context(name)``:
    that context is the model's own (a peer's state per context, as diffusers' hooks keep it),
    and the peer's fixed context is not laid over it."""

    def __init__(self, applied, callee, module) -> None:
        super().__init__()
        object.__setattr__(self, "_applied", applied)  # not submodules: nothing to register twice
        object.__setattr__(self, "_callee", callee)
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_in_context", False)
        self.config = module.config

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        object.__setattr__(self, "_in_context", True)
        try:
            with self._module.cache_context(name, **kwargs):
                yield
        finally:
            object.__setattr__(self, "_in_context", False)

    @property
    def device(self):
        return self._module.device

    @property
    def dtype(self):
        return self._module.dtype

    def forward(self, **kw):
        self._applied.pre_call(kw["timestep"])
        with contextlib.nullcontext() if self._in_context else self._applied.context():
            return self._callee(**kw)


def _label(row) -> str:
    m = row["method"]
    name = {"eager": "eager (no compile)", "inductor": "torch.compile (Inductor)", **FASTCACHE_LABELS}.get(m) \
        or P.LABELS[m]
    return name if row["param"] is None else f"{name}, {row['param']}={row['value']:g}"


def run_suite1(a) -> dict:
    from tqdm.auto import tqdm

    methods = _parse_list(a.methods, str)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {METHODS}")
    if "inductor" not in methods:
        raise ValueError("--methods: must include 'inductor' (the reference of speed and image quality)")
    methods = ["inductor"] + [m for m in methods if m != "inductor"]  # the reference first
    sweeps = {m: _parse_list(getattr(a, f"sweep_{m}")) for m in SWEEPS}
    if a.samples < 1 or a.steps < 3 or a.repeats < 1:
        raise ValueError("--samples and --repeats must be >= 1, --steps >= 3")
    runner = Suite1(a)
    rows = []
    todo = plan(methods, sweeps)
    for row in tqdm(todo, desc="suite 1", disable=a.no_progress):
        r = runner.run_row(row)
        rows.append(r)
        if not a.no_progress:
            tqdm.write(_row_line(r))
    return {"model": a.model, "samples": a.samples, "steps": a.steps, "guidance_scale": a.guidance,
            "scheduler": runner.job.schedulers[0],
            "classes": 10, "peer_mode": a.peer_mode, "repeats": a.repeats, "rows": rows}


def _row_line(r) -> str:
    if r["status"] != "ok":
        return f"  {r['label']}: {r['status']}: {r.get('reason', '')}"
    return (f"  {r['label']}: {r['seconds_per_image']:.4f} s/img, {r.get('speedup', float('nan')):.2f}x, "
            f"PSNR {r.get('psnr_db', float('nan')):.1f} dB")


# ----------------------------------------------------------------------------- suite 2


def pick_traces(rows: list[dict], count: int) -> list[dict]:
    """Up to ``count`` fastcache traces from suite 1, spread over their approximation ratios."""
    traces = sorted((r for r in rows if r.get("trace")), key=lambda r: r["approx_ratio"])
    if len(traces) <= count:
        return traces
    idx = np.unique(np.linspace(0, len(traces) - 1, count).round().astype(int))
    return [traces[i] for i in idx]


def subsample_rows(trace: list[list[bool]], steps: int) -> list[list[bool]]:
    """``steps`` rows of a trace taken at evenly spaced steps (keeps the first and last step)."""
    idx = np.linspace(0, len(trace) - 1, steps).round().astype(int)
    return [trace[i] for i in idx]


def run_suite2(a, suite1_rows: list[dict]) -> dict:
    import fastcache_fx
    from fastcache_fx import zoo
    from tqdm.auto import tqdm

    traces = pick_traces(suite1_rows, a.s2_traces)
    if not traces:
        raise ValueError("suite 2 needs fastcache decision traces from suite 1 (run suite 1 with fastcache first)")
    models = _parse_list(a.s2_models, str)
    out = {"steps": a.s2_steps, "batch": 2, "num_layers": a.s2_layers, "models": {}}
    for fam in models:
        if fam not in ("dit", "pixart"):
            raise ValueError(f"--s2-models: expected dit and/or pixart, got {fam!r}")
        name = {"dit": "DiT-XL/2 256px (256 tokens)", "pixart": "PixArt-Sigma 512px (1024 tokens)"}[fam]
        res = {"name": name, "rows": []}
        torch._dynamo.reset()
        model, kw = zoo.build(fam, "xl", batch=2, num_layers=a.s2_layers)
        res["num_layers"] = len(model.transformer_blocks)
        timesteps = torch.linspace(999, 0, a.s2_steps).long()

        def call(fn, t):
            k = dict(kw, timestep=torch.full((2,), int(t), dtype=torch.long))
            return fn(**k)

        def trajectory(fn, desc):
            times = []
            with torch.no_grad():
                for t in tqdm(timesteps, desc=desc, leave=False, disable=a.no_progress):
                    t0 = time.perf_counter()
                    call(fn, t)
                    times.append(time.perf_counter() - t0)
            return times

        with torch.no_grad():
            t0 = time.perf_counter()
            base = torch.compile(model, backend="inductor", dynamic=False)
            call(base, 999)
            res["inductor_compile_s"] = time.perf_counter() - t0
        base_times = trajectory(base, f"{fam} inductor")
        base_step = float(np.mean(base_times))
        res["inductor_step_s"] = base_step
        torch._dynamo.reset()
        model_fc, _ = zoo.build(fam, "xl", batch=2, num_layers=a.s2_layers)
        with torch.no_grad():
            t0 = time.perf_counter()
            fc = torch.compile(model_fc, backend=fastcache_fx.FastCacheBackend(), dynamic=False)
            call(fc, 999)
            res["fastcache_compile_s"] = time.perf_counter() - t0
        for tr in traces:
            rows = subsample_rows(tr["trace"], a.s2_steps)
            fastcache_fx.reset(model_fc)
            with fastcache_fx.replay_decisions(model_fc, rows, then="full"):
                times = trajectory(fc, f"{fam} replay {tr['label']}")
            # what was really approximated (a forced row without an anchor computes fully)
            done = [st["approx"] for st in fastcache_fx.stats(model_fc)["trace"][-len(rows):]]
            ratio = float(np.mean(done)) if done else 0.0
            step = float(np.mean(times))  # trajectory mean: approximated and full steps alternate
            res["rows"].append({"trace_from": tr["label"], "suite1_approx_ratio": tr["approx_ratio"],
                                "replayed_approx_ratio": ratio, "step_s": step,
                                "latency_ratio": step / base_step, "speedup": base_step / step})
            if not a.no_progress:
                r = res["rows"][-1]
                tqdm.write(f"  {name}: trace {tr['label']}: approx {ratio:.2f}, latency ratio {r['latency_ratio']:.3f}")
        out["models"][fam] = res
        del model, model_fc, base, fc
    return out


# ----------------------------------------------------------------------------- report


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = round(kb / 2 ** 20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("diffusers", "cache_dit"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        load = round(os.getloadavg()[0], 1)  # other jobs on the machine make single timings noisy
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem,
            "load_avg_1m_at_start": load,
            "os": platform.platform(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            **versions}


def _commit() -> str:
    try:
        c = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return c.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _f(v, fmt) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt)


def suite1_table(s1: dict) -> str:
    """Markdown table of suite 1 rows (n/a and error rows keep their reason)."""
    lines = ["| method | compiled | s / image | speedup vs Inductor | PSNR (dB) | SSIM | class acc. | digits-FID | approx. ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s1["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | - | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        psnr = r.get("psnr_db")
        lines.append(
            f"| {r['label']} | {'yes' if r['compiled'] else 'no'} | {_f(r['seconds_per_image'], '.4f')} | "
            f"{_f(r.get('speedup'), '.2f')}x | {'(reference)' if r['method'] == 'inductor' else _f(psnr, '.1f')} | "
            f"{_f(r.get('ssim'), '.3f')} | {_f(r['class_accuracy'], '.2f')} | {_f(r['digits_fid'], '.1f')} | "
            f"{_f(r.get('approx_ratio'), '.2f')} |")
    return "\n".join(lines)


def suite2_table(s2: dict) -> str:
    lines = ["| model | blocks | trace from (suite 1) | approx. ratio replayed | step (s) | latency / Inductor | speedup |",
             "|---|---|---|---|---|---|---|"]
    for fam, res in s2["models"].items():
        lines.append(f"| {res['name']} | {res['num_layers']} | Inductor baseline | 0 | {res['inductor_step_s']:.3f} | 1.000 | 1.00x |")
        for r in res["rows"]:
            lines.append(f"| {res['name']} | {res['num_layers']} | {r['trace_from']} | {r['replayed_approx_ratio']:.2f} | "
                         f"{r['step_s']:.3f} | {r['latency_ratio']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def _is_fc(r) -> bool:
    return r["method"] in FASTCACHE_VARIANTS


def frontier(rows: list[dict]) -> list[dict]:
    """The Pareto frontier (speedup vs PSNR) of ``rows``: no other row is both faster and at least
    as high in PSNR; sorted by PSNR."""
    front = [r for r in rows if not any(o["speedup"] > r["speedup"] and o["psnr_db"] >= r["psnr_db"] for o in rows)]
    return sorted(front, key=lambda r: r["psnr_db"])


def verdict(s1: dict) -> list[str]:
    """Plain sentences on the targets, from the measured rows only: (1) >= 2x vs Inductor at PSNR
    >= 30 dB; (2) at every peer row's PSNR a fastcache row at least as fast at equal or higher
    PSNR; (3) at >= 70 % of block computations approximated, PSNR >= 3 dB above the best peer
    row at that share; (4) the default options (the error rule at the default ``error_budget``:
    the ``fastcache_error`` row at that value) give >= 30 %
    approximated at >= 30 dB with the baseline's class accuracy."""
    ok = [r for r in s1["rows"] if r["status"] == "ok" and r["method"] not in BASELINES and r.get("psnr_db") is not None]
    fc = [r for r in ok if _is_fc(r)]
    if not fc:
        return ["fastcache was not run."]
    out = []
    good = [r for r in fc if r["psnr_db"] >= 30]
    best = max(good, key=lambda r: r["speedup"]) if good else None
    if best and best["speedup"] >= 2:
        out.append(f"Target 1 met: {best['label']} is {best['speedup']:.2f}x faster than Inductor at "
                   f"{best['psnr_db']:.1f} dB PSNR (>= 2x at >= 30 dB).")
    elif best:
        out.append(f"Target 1 NOT met: the fastest fastcache row at >= 30 dB ({best['label']}) is "
                   f"{best['speedup']:.2f}x faster than Inductor (target 2x).")
    else:
        out.append("Target 1 NOT met: no fastcache row reached 30 dB PSNR.")
    losses = [r for r in ok if not _is_fc(r)
              and not any(f["psnr_db"] >= r["psnr_db"] and f["speedup"] >= r["speedup"] for f in fc)]
    if not losses:
        out.append("Target 2 met: at every peer row's PSNR a fastcache row is at least as fast at equal or higher PSNR.")
    else:
        out.append("Target 2 NOT met for: " + "; ".join(
            f"{r['label']} ({r['speedup']:.2f}x at {r['psnr_db']:.1f} dB)" for r in losses)
            + " - no fastcache row is at least as fast at equal or higher PSNR.")
    peers70 = [r for r in ok if not _is_fc(r) and (r.get("approx_ratio") or 0) >= 0.7]
    fc70 = [r for r in fc if (r.get("approx_ratio") or 0) >= 0.7]
    if not fc70:
        out.append("Target 3 not measurable: no fastcache row approximated >= 70 % of block computations.")
    elif not peers70:
        out.append(f"Target 3: no peer row reports >= 70 % approximated; best fastcache row there: "
                   f"{max(fc70, key=lambda r: r['psnr_db'])['label']} at {max(r['psnr_db'] for r in fc70):.1f} dB.")
    else:
        bp = max(peers70, key=lambda r: r["psnr_db"])
        bf = max(fc70, key=lambda r: r["psnr_db"])
        met = bf["psnr_db"] >= bp["psnr_db"] + 3
        out.append(f"Target 3 {'met' if met else 'NOT met'}: at >= 70 % approximated, {bf['label']} gives "
                   f"{bf['psnr_db']:.1f} dB against {bp['psnr_db']:.1f} dB for the best peer ({bp['label']}).")
    default_budget = fastcache_fx.FastCacheConfig().error_budget
    default = [r for r in fc if r["method"] == "fastcache_error" and r.get("value") == default_budget]
    base = next((r for r in s1["rows"] if r["method"] == "inductor" and r["status"] == "ok"), None)
    if default and base:
        d = default[0]
        met = d.get("approx_ratio", 0) >= 0.3 and d["psnr_db"] >= 30 and d["class_accuracy"] >= base["class_accuracy"]
        out.append(f"Target 4 {'met' if met else 'NOT met'}: the defaults (error rule, budget {default_budget}) approximate {d.get('approx_ratio', 0):.0%} "
                   f"at {d['psnr_db']:.1f} dB, class accuracy {d['class_accuracy']:.2f} (baseline "
                   f"{base['class_accuracy']:.2f}).")
    return out


def plot(s1: dict, path: Path) -> None:
    """Speedup vs PSNR: one curve per peer (sorted by PSNR), fastcache's variants as markers and
    the Pareto frontier of all fastcache rows as a thick line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    groups: dict[str, list] = {}
    for r in s1["rows"]:
        if r["status"] == "ok" and r["method"] not in ("inductor",) and r.get("psnr_db") is not None:
            groups.setdefault(r["method"], []).append(r)
    fc_rows = []
    for i, (m, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["psnr_db"])
        xs, ys = [r["psnr_db"] for r in rs], [r["speedup"] for r in rs]
        if m in FASTCACHE_VARIANTS:
            fc_rows += rs
            ax.plot(xs, ys, ls="none", marker="os^DvP"[list(FASTCACHE_VARIANTS).index(m) % 6], ms=7,
                    color="black", mfc="white" if m != "fastcache" else "black", label=FASTCACHE_LABELS[m], zorder=6)
        else:
            name = {"eager": "eager"}.get(m) or P.LABELS[m]
            ax.plot(xs, ys, lw=1, marker="s", ms=4, label=name + ("" if rs[0]["compiled"] else " (eager)"))
    if fc_rows:
        front = frontier(fc_rows)
        ax.plot([r["psnr_db"] for r in front], [r["speedup"] for r in front], color="black", lw=2.5, zorder=5,
                label="fastcache frontier")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.axhline(2.0, color="gray", lw=0.8, ls="--")
    ax.axvline(30.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("PSNR vs Inductor image of the same seed (dB, capped at 100)")
    ax.set_ylabel("speedup vs torch.compile (Inductor)")
    ax.set_title(f"{job(s1.get('model', 'dit')).title}, {s1['samples']} samples, {s1['steps']} steps", fontsize=9)
    ax.legend(fontsize=6.5, loc="best", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- BEGIN compare -->", "<!-- END compare -->"


def markers(model: str = "dit") -> tuple[str, str]:
    """The RESULTS.md section markers of ``model``'s results: ``compare`` or ``compare_mmdit``."""
    if model == "dit":
        return BEGIN, END
    return f"<!-- BEGIN compare_{model} -->", f"<!-- END compare_{model} -->"


def markdown(record: dict, png_rel: str | None) -> str:
    """The compare section of RESULTS.md (without the markers)."""
    meta = record["meta"]
    mc = meta["machine"]
    L = ["## Benchmarks against peers (`benchmarks/compare.py`)", "",
         f"Measured {meta['date']} at commit {meta['commit']} on {mc['cpu']} ({mc['cores']} cores, "
         f"{mc['torch_threads']} torch threads, {mc['memory_gib']} GiB, GPU: {mc['gpu'] or 'none'}), "
         f"torch {mc['torch']}, diffusers {mc['diffusers']}, cache-dit {mc['cache_dit']}. "
         f"Load average at the start of the run: {mc.get('load_avg_1m_at_start')} (on {mc['cores']} cores: "
         "the machine was shared with other jobs, so single timings are noisy; compare ratios within the run). "
         "Speed is always a ratio against the Inductor baseline measured in the same run.", ""]
    s1 = record.get("suite1")
    if s1:
        when = s1.get("measured")
        mmdit = s1.get("model") == "mmdit"
        L += ["### Suite 1: quality and speed on the bundled reference " + ("MMDiT" if mmdit else "DiT"), "",
              (f"(Suite 1 measured {when['date']} at commit {when['commit']}, load average "
               f"{when['load_avg_1m_at_start']} at its start.) " if when else "") +
              ("`SD3Transformer2DModel` (6 joint blocks, 64 image + 4 class tokens, 16x16 pixels; class accuracy "
               "and digits-FID on 2x2-pooled 8x8 images) in the real `StableDiffusion3Pipeline`, "
               if mmdit else "`DiTTransformer2DModel` (6 blocks, 64 tokens), ") +
              f"{s1['samples']} samples over 10 classes, "
              f"{s1['steps']} {'flow-matching Euler' if mmdit else 'DDIM'} steps, CFG {s1['guidance_scale']} "
              f"(batched: one transformer call per step with "
              f"batch {2 * s1['samples']}). Seconds per image = fastest of {s1.get('repeats', 1)} timed trajectory(ies) / "
              "samples, after one untimed warm-up trajectory (compile and every graph variant). PSNR/SSIM: each image against the Inductor image of the same seed "
              f"(PSNR capped at {PSNR_CAP:g} dB). Approx. ratio: fastcache's approximated (block, step) pairs; "
              "for cache-dit, steps served from the cache. Peers run compiled where torch.compile worked "
              "(column 'compiled').", "", suite1_table(s1), ""]
        L += ["**Targets.** " + " ".join(verdict(s1)), ""]
        if png_rel:
            L += [f"![speedup vs PSNR]({png_rel})", ""]
        notes = [r for r in s1["rows"] if r.get("note") or r.get("reason")]
        if notes:
            L += ["How each peer was applied:", ""]
            seen = set()
            for r in notes:
                text = r.get("reason") if r["status"] != "ok" else r["note"]
                key = (r["method"], text)
                if key in seen:
                    continue
                seen.add(key)
                L.append(f"- {_label(dict(r, param=None))}: {text}")
            L.append("")
    s2 = record.get("suite2")
    if s2:
        L += ["### Suite 2: speed at scale (random weights, decision traces replayed)", "",
              f"Batch 2 (one CFG pair), fp32, {s2['steps']} steps per trajectory (timesteps 999..0), "
              f"num_layers={s2['num_layers'] or 'full (28)'}. Each fastcache trajectory replays a suite-1 trace "
              "(`fastcache_fx.replay_decisions`; rows taken at evenly spaced steps of the 50-step trace, "
              "blocks mapped proportionally onto this model's blocks). Step = mean wall time of a call of "
              "the compiled transformer.", "", suite2_table(s2), ""]
    if meta.get("notes"):
        L += ["### Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    L += ["### Reproduce", "", "```bash", ". .venv/bin/activate && pip install -e '.[bench]'"]
    for c in meta.get("commands", [meta["command"]]):
        L.append(c)
    L += ["```", ""]
    return "\n".join(L)


def write_section(md_path: Path, text: str, model: str = "dit") -> None:
    """Replace the text between the compare markers of ``md_path`` (append the section if missing);
    ``model`` "mmdit" uses the ``compare_mmdit`` markers."""
    begin, end = markers(model)
    body = f"{begin}\n{text.rstrip()}\n{end}"
    if md_path.exists():
        cur = md_path.read_text()
        if begin in cur and end in cur:
            pre, rest = cur.split(begin, 1)
            post = rest.split(end, 1)[1]
            md_path.write_text(pre + body + post)
            return
        md_path.write_text(cur.rstrip() + "\n\n" + body + "\n")
    else:
        md_path.write_text("# Benchmark results\n\n" + body + "\n")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--suites", default="1", help="which suites to run: 1, 2 or 1,2 (suite 2 alone reads suite 1 from --out-json)")
    p.add_argument("--model", default="dit", choices=MODELS,
                   help="suite 1 model: the reference DiT or the flow-matching MMDiT (SD3 pipeline)")
    p.add_argument("--samples", type=int, default=100, help="suite 1 images (labels cycle over the 10 classes)")
    p.add_argument("--steps", type=int, default=None, help="suite 1 steps (default: 50 DDIM dit, 28 flow Euler mmdit)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 2.0 dit, the model's for mmdit)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {METHODS}")
    for m, (knob, default) in SWEEPS.items():
        p.add_argument(f"--sweep-{m.replace('_', '-')}", dest=f"sweep_{m}", default=default, help=f"{m}: values of {knob}")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice); 1 keeps timings stable on a busy machine")
    p.add_argument("--repeats", type=int, default=1, help="timed trajectories per row (the fastest counts)")
    p.add_argument("--peer-mode", choices=("compiled", "eager"), default="compiled",
                   help="compile peers with Inductor (eager fallback if compile fails) or run them eager")
    p.add_argument("--s2-models", default="dit,pixart")
    p.add_argument("--s2-steps", type=int, default=10, help="suite 2 steps per trajectory")
    p.add_argument("--s2-layers", type=int, default=None, help="suite 2 num_layers (default: full 28)")
    p.add_argument("--s2-traces", type=int, default=3, help="suite 2: how many suite-1 traces to replay")
    p.add_argument("--out-json", type=Path, default=None, help="default: compare.json (dit), compare_mmdit.json")
    p.add_argument("--out-png", type=Path, default=None, help="default: compare.png (dit), compare_mmdit.png")
    p.add_argument("--results-md", type=Path, default=HERE / "RESULTS.md", help="file whose compare section is rewritten")
    p.add_argument("--note", action="append", default=[],
                   help="a sentence for the Notes list of the results section (repeatable; kept in the JSON)")
    p.add_argument("--render", action="store_true",
                   help="run nothing: redraw the plot and the RESULTS.md section from --out-json")
    p.add_argument("--no-progress", action="store_true")
    return p


def _write(a, record: dict) -> None:
    """compare.json, compare.png and the compare section of RESULTS.md from ``record``."""
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(record, indent=1) + "\n")
    png_rel = None
    if record.get("suite1"):
        plot(record["suite1"], a.out_png)
        try:
            png_rel = os.path.relpath(a.out_png, a.results_md.parent)
        except ValueError:
            png_rel = str(a.out_png)
    write_section(a.results_md, markdown(record, png_rel), model=a.model)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    j = job(a.model)
    stem = "compare" if a.model == "dit" else f"compare_{a.model}"
    a.out_json = a.out_json or HERE / f"{stem}.json"
    a.out_png = a.out_png or HERE / f"{stem}.png"
    a.steps = a.steps or j.steps
    a.guidance = j.guidance if a.guidance is None else a.guidance
    if a.threads is not None:
        if a.threads < 1:
            raise ValueError("--threads: must be >= 1")
        torch.set_num_threads(a.threads)
    suites = set(_parse_list(a.suites, int))
    if not suites or suites - {1, 2}:
        raise ValueError(f"--suites: expected 1, 2 or 1,2, got {a.suites!r}")
    if 2 in suites and a.model != "dit":
        raise ValueError("--suites: suite 2 replays reference-DiT traces on DiT-XL/PixArt; run it with --model dit")
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    previous = json.loads(a.out_json.read_text()) if a.out_json.exists() else {}
    if a.render:
        if not previous:
            raise ValueError(f"--render: no results in {a.out_json}")
        previous.setdefault("meta", {}).setdefault("notes", []).extend(a.note)
        _write(a, previous)
        print(f"redrew {a.out_png} and the compare section of {a.results_md} from {a.out_json}")
        return 0
    record = {"meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                       "commit": _commit(), "machine": machine(), "command": command, "commands": [command],
                       "notes": list(a.note)}}
    if 1 in suites:
        record["suite1"] = run_suite1(a)
    elif previous.get("suite1"):
        record["suite1"] = previous["suite1"]
        pm = previous.get("meta", {})
        record["suite1"].setdefault("measured", {"date": pm.get("date"), "commit": pm.get("commit"),
                                                 "load_avg_1m_at_start": pm.get("machine", {}).get("load_avg_1m_at_start")})
        record["meta"]["commands"] = previous.get("meta", {}).get("commands", [])[:1] + [command]
    if 2 in suites:
        if not record.get("suite1"):
            raise ValueError("--suites 2 needs suite 1 results (run suite 1 first, or --suites 1,2)")
        if 1 in suites:
            _write(a, record)  # suite 1 is kept even if suite 2 is interrupted
        record["suite2"] = run_suite2(a, record["suite1"]["rows"])
    _write(a, record)
    if record.get("suite1"):
        print(suite1_table(record["suite1"]))
        print("\n".join(verdict(record["suite1"])))
    if record.get("suite2"):
        print(suite2_table(record["suite2"]))
    print(f"wrote {a.out_json}, {a.out_png} and the compare section of {a.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
