"""``target_psnr`` with a known sampler: the output budget spent on the final sample (issue 37).

The graph's output budget (``ops.output_error``) bounds the relative error of the transformer's
output over a run of approximated steps. What the user sees is the final sample, and between the
two stand the sampler's coefficient on the model output at each step, the guidance scale and how
CFG is called. ``QualityTarget`` turns the target into per-step controls of the graph:

- weight w_k = f_ctx |s_k| rms(O) / E, with s_k the final sample's sensitivity to the model output
  at step k (``sensitivity.output_sensitivity``, read off the scheduler), rms(O) the root mean
  square of the transformer's output at this context's previous call, E = R 10^(-T / 20) the final
  root-mean-square error that PSNR T allows on data range R (2: samples in [-1, 1]), and f_ctx the
  weight of this call's output in the guided output u + g (c - u): g for a separate "cond" call,
  g - 1 for a separate "uncond" call, 1 for batched CFG (one decision for both halves: their
  errors are alike and mostly cancel in g (c - u); measured) and without CFG; times the setting's
  calibrated factor (``calibrate``), else ``UNCALIBRATED_SCALE``. So e_k = w_k p_k (p_k the
  graph's predicted relative output error) is the predicted final-sample error of the step in
  units of E.
- The errors of different steps (and of the separate CFG calls of one step) add in quadrature:
  the predicted final error is sqrt(sum e_k^2). Errors made at different steps point in unaligned
  directions and the model's own feedback damps them: a linear sum overestimated the measured
  final error about 5x at 50 steps and 3x at 10 (the overestimate of a linear sum of n unaligned
  errors grows as sqrt(n)); the quadrature sum's measured / predicted ratio is about the same at
  10 and 50 steps (benchmarks/quality_target.py, docs/quality.md).
- offset c = budget - (the current run's part the graph holds) - a_k, with the allowance
  a_k = sqrt(max(0, (k + 1) / N - sum_{earlier} e^2)): the graph then approximates while this
  step's e <= a_k, i.e. the trajectory's squared error stays within the share (k + 1) / N of E^2,
  paced evenly over its N steps (steps the sensitivity makes expensive leave their share to later
  ones).

Without a known scheduler (a bare ``torch.compile``) the weight is 1 and the offset reproduces the
fixed relation ``config.budget_for_psnr`` (the best estimate without the sampler).
The sampler is known from a pipeline (``enable_fastcache(pipe, target_psnr=...)``: its
``scheduler`` after ``set_timesteps`` and its ``_guidance_scale``) or from ``set_sampler`` (custom
sampling loops). A transformer call's ``timestep`` gives the step index.
"""

from __future__ import annotations

import collections
import weakref

import torch

from ..config import budget_for_psnr
from ..sensitivity import output_sensitivity, step_index
from .requests import current_request

#: the factor on the weight before a setting is calibrated. The measured / predicted final error of
#: the quadrature sum (factor 1) had a median of 0.78 (-2.2 dB) over 67 cells of four models, 0.1-1.8
#: apart from single early approximations (benchmarks/quality_target.py --quick, 2026-12-08);
#: 1.5 keeps a cell predicted up to 3.5 dB too low within the target
UNCALIBRATED_SCALE = 1.5
#: dB above the target a calibration's own samples must reach (``calibrate``)
CALIBRATION_MARGIN = 1.0
#: the most a calibration divides the uncalibrated factor by (``calibrate``)
MAX_LOOSENING = 3.0
#: the pipeline attributes that hold a denoiser's guidance scale, first found and not None wins
#: (Wan 2.2's low-noise expert ``transformer_2`` runs at the pipeline's ``guidance_scale_2``)
GUIDANCE_ATTRIBUTES = {"transformer": ("_guidance_scale",),
                       "transformer_2": ("_guidance_scale_2", "_guidance_scale")}
#: requests whose trajectory state a QualityTarget keeps (least recently started dropped first)
MAX_REQUESTS = 64
#: the weight of a call before its context's output scale is known (the first step, which is
#: computed fully anyway): large enough that nothing is approximated
UNKNOWN_WEIGHT = 1e30


def _of_request(name: str, doc: str) -> property:
    """A ``QualityTarget`` attribute kept per request (``QualityTarget._t``)."""
    return property(lambda self: getattr(self._t(), name), lambda self, v: setattr(self._t(), name, v), doc=doc)


class QualityTarget:
    """Per-step output-budget controls of one model for a target PSNR (see the module doc).

    Args:
        target_psnr: T, dB of the final sample against computing every block.
        budget: the ``error_budget`` the model's graphs were compiled with.
        pipe: the pipeline whose ``scheduler`` and ``_guidance_scale`` the model serves (held
            weakly), or None (then ``bind`` gives the sampler).
        data_range: R of the PSNR (2 for samples in [-1, 1]).
        aware: False ignores the sampler and keeps the fixed relation (for comparisons).
        denoiser: the pipeline attribute of the model (``GUIDANCE_ATTRIBUTES``: which guidance
            scale it runs at).

    Raises:
        ValueError: a target above ``config.MAX_TARGET_PSNR`` (that one computes fully: the
            config handles it) or not > 0.
    """

    def __init__(self, target_psnr: float, budget: float, pipe=None, data_range: float = 2.0,
                 aware: bool = True, denoiser: str = "transformer") -> None:
        fixed = budget_for_psnr(float(target_psnr)) if target_psnr > 0 else None
        if fixed is None:
            raise ValueError(f"target_psnr: expected 0 < target <= MAX_TARGET_PSNR, got {target_psnr!r}")
        self.target = float(target_psnr)
        self.budget = float(budget)
        self.allowed = data_range * 10.0 ** (-self.target / 20.0)
        self.fixed_offset = self.budget - fixed  # no sampler known: the fixed relation's budget
        self._pipe = weakref.ref(pipe) if pipe is not None and aware else None
        self.aware = aware
        self.denoiser = denoiser
        self._bound = None  # (scheduler copy, guidance) from bind()
        self._ts_id = None
        self.sens: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.guidance = 1.0
        self.trajectories = 0
        self.sampler_name = None
        self.calibrations: dict[tuple, dict] = {}  # setting -> {"scale", "rounds", "seconds", ...}
        self.full = False  # compute every block (a calibration's reference generation)
        # request id -> its trajectory (spent error, step, output scales): concurrent requests on
        # one model pace their own trajectories (runtime.requests)
        self._per: collections.OrderedDict[str, _Trajectory] = collections.OrderedDict()
        self.last = _Trajectory()  # the trajectory of the latest call, whichever request made it
        self._new_trajectory()

    # the calling request's trajectory ----------------------------------------------------------
    def _t(self) -> "_Trajectory":
        rid = current_request().id
        t = self._per.get(rid)
        if t is None:
            t = self._per[rid] = _Trajectory()
            while len(self._per) > MAX_REQUESTS:
                self._per.popitem(last=False)
        return t

    sq = _of_request("sq", "the squared predicted final error the calling request's trajectory spent "
                           "(units of the allowed one)")
    run = _of_request("run", "{context: the linear sum of the predicted errors of the context's current run of "
                             "approximated steps}")
    rms = _of_request("rms", "{context: the root mean square of its previous output}")
    k = _of_request("k", "the step index of the calling request's trajectory")
    key = _of_request("key", "the setting of the calling request's trajectory (``setting_key``), None before its first call")
    scale = _of_request("scale", "the factor on the weight of the calling request's setting (calibrated, else uncalibrated)")

    # the sampler -------------------------------------------------------------------------
    def bind(self, scheduler, guidance_scale: float = 1.0) -> None:
        """Use ``scheduler`` (after ``set_timesteps``, before its first step) and CFG scale
        ``guidance_scale`` for the following calls (a custom sampling loop; a pipeline's are read
        by themselves). Raises ValueError without timesteps."""
        if not self.aware:
            return
        self._set_sampler(scheduler, guidance_scale)
        self._bound = True

    def _set_sampler(self, scheduler, guidance: float) -> None:
        self.sens = output_sensitivity(scheduler).abs()
        self.timesteps = scheduler.timesteps.detach().double().cpu().clone()
        self.sampler_name = type(scheduler).__name__
        self._ts_id = id(scheduler.timesteps)
        self.guidance = float(guidance)
        self._new_trajectory()

    def _new_trajectory(self) -> None:
        self._per.pop(current_request().id, None)
        self._t()  # a fresh one, the most recently started
        self.trajectories += 1

    def setting_key(self, shape) -> tuple:
        """What a calibration is kept for: the scheduler class, its timesteps, the guidance scale
        and the shape of the transformer's input (resolution, frames, batch)."""
        ts = tuple(round(float(t), 3) for t in self.timesteps)
        return (self.sampler_name, ts, round(self.guidance, 4), tuple(shape) if shape is not None else None)

    def uncalibrated_scale(self) -> float:
        """The weight's factor of a setting without calibration (``UNCALIBRATED_SCALE``)."""
        return UNCALIBRATED_SCALE

    def before_call(self, timestep, shape=None) -> None:
        """A transformer call at ``timestep`` on an input of ``shape``: find the sampler (a
        pipeline's scheduler after a new ``set_timesteps``) and the step index; a step index below
        the last starts a trajectory. The first call of a trajectory looks up its setting's
        calibration (``calibrate_target``)."""
        pipe = self._pipe() if self._pipe is not None else None
        if pipe is not None and not self._bound:
            sched = getattr(pipe, "scheduler", None)
            ts = getattr(sched, "timesteps", None)
            if ts is not None and id(ts) != self._ts_id:
                names = GUIDANCE_ATTRIBUTES.get(self.denoiser, ("_guidance_scale",))
                g = next((v for v in (getattr(pipe, a, None) for a in names) if v is not None), None)
                self._set_sampler(sched, float(g) if isinstance(g, (int, float)) else 1.0)
                self.k = -1
        if self.timesteps is None or timestep is None:
            return
        k = step_index(self.timesteps, timestep)
        if k < self.k:
            self._new_trajectory()
        t = self._t()
        if t.key is None:
            t.k0 = k  # a trajectory may start later (Wan 2.2's second expert, img2img)
            t.key = self.setting_key(shape)
            cal = self.calibrations.get(t.key)
            t.scale = cal["scale"] if cal is not None else self.uncalibrated_scale()
        t.k = k
        self.last = t

    def after_call(self, ctx: str, output) -> None:
        """Keep the root mean square of this context's output (the next call's scale)."""
        o = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(o, torch.Tensor):
            self.rms[ctx] = float(o.detach().float().pow(2).mean().sqrt())

    # the graph's controls ------------------------------------------------------------------
    def context_factor(self, ctx: str) -> float:
        """f_ctx: the weight of this call's output in the guided output (module doc)."""
        g = self.guidance
        if g <= 1.0 or ctx not in ("cond", "uncond"):
            return 1.0  # batched CFG: both halves approximated alike, their errors nearly cancel in g (c - u)
        return g - 1.0 if ctx == "uncond" else g

    def weight(self, ctx: str) -> float:
        """w_k of this context's call at the current step (``UNKNOWN_WEIGHT`` before its output
        scale is known)."""
        t = self._t()
        rms = t.rms.get(ctx)
        if rms is None or self.full:
            return UNKNOWN_WEIGHT
        return t.scale * self.context_factor(ctx) * float(self.sens[t.k]) * rms / self.allowed

    def pace(self) -> float:
        """The share of the allowed squared final error the trajectory may have spent by the end of
        step k: (k + 1 - k0) / N, k0 its first step (a model that serves only the later steps,
        Wan 2.2's low-noise expert, spends only their share: the two experts together stay
        within E)."""
        t = self._t()
        return (t.k + 1 - t.k0) / len(self.sens)

    def allowance(self) -> float:
        """a_k: the most this step's predicted final error may be (units of the allowed one)."""
        return max(0.0, self.pace() - self.sq) ** 0.5

    def controls(self, ctx: str, device) -> dict[str, torch.Tensor]:
        """"output.weight" and "output.offset" [] float32 for this call."""
        if self.sens is None:
            w, c = 1.0, self.fixed_offset
        else:
            w = min(self.weight(ctx), UNKNOWN_WEIGHT)
            c = self.budget - self._t().run.get(ctx, 0.0) - self.allowance()
        return {"output.weight": torch.tensor(w, dtype=torch.float32, device=device),
                "output.offset": torch.tensor(c, dtype=torch.float32, device=device)}

    def after_step(self, ctx: str, step_error: torch.Tensor) -> None:
        """The graph's predicted error of the step (weighted: units of the allowed final error):
        add its square to the trajectory; a step that approximated nothing ends the context's run."""
        if self.sens is None:
            return
        e, t = float(step_error), self._t()
        if e > 0:
            t.run[ctx] = t.run.get(ctx, 0.0) + e
            t.sq += e * e
            t.steps.append((t.k, ctx, e / t.scale if t.scale > 0 else 0.0))
        else:
            t.run[ctx] = 0.0

    def describe(self) -> dict:
        """For ``stats()``: the target, whether the sampler was known, the latest trajectory's
        predicted final error (units of the allowed one; of the request that called last: a
        pipeline call's request has ended when stats() is read) and its step count."""
        t = self.last
        return {"target_psnr": self.target, "sampler_known": self.sens is not None,
                "steps": None if self.sens is None else len(self.sens), "guidance_scale": self.guidance,
                "predicted_final_error": t.sq ** 0.5, "allowed_rms_error": self.allowed,
                "calibration": self.calibrations.get(t.key) if t.key is not None else None,
                "calibrations": len(self.calibrations), "step_errors": list(t.steps)}


class _Trajectory:
    """One request's trajectory under a ``QualityTarget`` (its properties of the same names)."""

    __slots__ = ("sq", "run", "rms", "k", "k0", "key", "scale", "steps")

    def __init__(self) -> None:
        self.sq, self.run, self.rms, self.k, self.k0, self.key, self.scale = 0.0, {}, {}, 0, 0, None, UNCALIBRATED_SCALE
        # (step index, context, predicted final error of the step without the weight's factor)
        self.steps: list[tuple[int, str, float]] = []


def quality_forward(forward, entry):
    """``forward`` wrapped so that ``entry.quality`` sees every call's timestep (before) and
    output (after)."""
    import functools

    from .context import current_context

    @functools.wraps(forward)
    def call(*args, **kwargs):
        q = entry.quality
        if q is None:
            return forward(*args, **kwargs)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        x = kwargs.get("hidden_states", args[0] if args else None)
        q.before_call(t, x.shape if isinstance(x, torch.Tensor) else None)
        out = forward(*args, **kwargs)
        q.after_call(current_context(), out)
        return out

    return call


def calibrate(qs, run, *, rounds: int = 3) -> dict:
    """Calibrate the ``QualityTarget``s ``qs`` (one, or a pipeline's denoisers together: Wan 2.2's
    experts) for the setting ``run`` generates (see ``api.calibrate_target``): one generation
    computing every block (the reference), then up to ``rounds`` cached ones, each moving the
    weight's factor by 10^((T + 2 - PSNR) / 10) (the output budget's PSNR changes by about 10 dB
    per decade, ``config.PSNR_PER_DECADE``) until the PSNR is in [T + 1, T + 4]; the factor kept is
    the smallest whose PSNR was >= T + 1 (none: the largest tried, times 10), and at least the
    uncalibrated one / ``MAX_LOOSENING``. The 1 dB margin: other samples of the same setting fell
    up to 2.2 dB below the calibration samples' PSNR (benchmarks/quality_target.py, unseen DiT,
    with a margin of -1 dB). Each denoiser keeps the record under its own setting (a denoiser the
    generation never called keeps none). ``run()`` -> the final sample [B, ...], the same noise
    every call. Returns the record: scale, rounds (PSNR per round), generations, seconds."""
    import time

    from ..config import PSNR_PER_DECADE

    qs = [qs] if isinstance(qs, QualityTarget) else list(qs)
    target = qs[0].target
    t0 = time.perf_counter()
    for q in qs:
        q.full = True
    try:
        ref = run().detach().float()
    finally:
        for q in qs:
            q.full = False
    # the reference generation's settings (its pipeline call's request has ended)
    keyed = [(q, q.last.key) for q in qs if q.last.key is not None]
    scale, tried = qs[0].uncalibrated_scale(), []
    for _ in range(rounds):
        for q, key in keyed:
            q.calibrations[key] = {"scale": scale}
        out = run().detach().float()
        mse = (out - ref).pow(2).flatten(1).mean(1).clamp_min(1e-20)
        psnr = float((10 * torch.log10(2.0 ** 2 / mse)).clamp_max(100.0).mean())
        tried.append({"scale": scale, "psnr": round(psnr, 2)})
        if target + CALIBRATION_MARGIN <= psnr <= target + CALIBRATION_MARGIN + 3:
            break
        scale *= 10.0 ** ((target + CALIBRATION_MARGIN + 1 - psnr) / PSNR_PER_DECADE)
    ok = [r for r in tried if r["psnr"] >= target + CALIBRATION_MARGIN]
    best = min(ok, key=lambda r: r["scale"])["scale"] if ok else 10.0 * max(r["scale"] for r in tried)
    # loosen at most MAX_LOOSENING x: a few calibration samples over-loosened the factor to
    # 24.3 dB on other samples at T = 30 (DiT, DDIM 10 steps, margin -1 dB; benchmarks/quality_target.py)
    best = max(best, tried[0]["scale"] / MAX_LOOSENING)
    rec = {"scale": best, "rounds": tried, "generations": 1 + len(tried),
           "seconds": round(time.perf_counter() - t0, 2)}
    for q, key in keyed:
        q.calibrations[key] = rec
    return rec
