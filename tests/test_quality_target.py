"""target_psnr on the final sample (issue 37): the sampler's sensitivity, the per-step controls,
calibration per setting (runtime.quality, sensitivity.py)."""

import copy
import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.config import MAX_TARGET_PSNR, budget_for_psnr
from fastcache_fx.ops import output_error as O
from fastcache_fx.runtime import registry
from fastcache_fx.runtime.quality import UNCALIBRATED_SCALE, UNKNOWN_WEIGHT, QualityTarget, calibrate
from fastcache_fx.sensitivity import output_sensitivity, step_index

COSINE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def _schedulers():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                           UniPCMultistepScheduler)

    return {"ddim": lambda: DDIMScheduler(**COSINE, clip_sample=False),
            "dpmsolver": lambda: DPMSolverMultistepScheduler(**COSINE, timestep_spacing="leading"),
            "unipc": lambda: UniPCMultistepScheduler(**COSINE),
            "flow_euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}


def _chain(sched, outs, x):
    for k, t in enumerate(sched.timesteps):
        x = sched.step(outs[k], t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("name", ["ddim", "dpmsolver", "unipc", "flow_euler"])
def test_sensitivity_equals_the_schedulers_own_step_on_a_perturbation(name):
    """s_k read off the scheduler equals (x_0' - x_0) / d of the real chain on a real sample when
    the model output of step k alone is perturbed by d (multistep history and corrector included)."""
    sched = _schedulers()[name]()
    sched.set_timesteps(12)
    s = output_sensitivity(sched)
    assert s.shape == (12,) and len(sched.timesteps) == 12  # the scheduler itself is untouched
    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(2, 1, 4, 4, generator=g)
    outs = [0.01 * torch.randn(2, 1, 4, 4, generator=g) for _ in range(12)]
    base = _chain(copy.deepcopy(sched), outs, x.clone())
    for k in (1, 5, 10):
        d = torch.randn(2, 1, 4, 4, generator=g)
        moved = _chain(copy.deepcopy(sched), [o + d if i == k else o for i, o in enumerate(outs)], x.clone())
        # least squares over the elements: float32 rounding of the base sample dominates where d is tiny
        ratio = float(((moved - base) * d).sum() / d.pow(2).sum())
        assert ratio == pytest.approx(float(s[k]), rel=1e-3)
    # read mid-trajectory (Wan 2.2's second expert): the same coefficients
    for k, t in enumerate(sched.timesteps[:5]):
        x = sched.step(outs[k], t, x, return_dict=False)[0]
    assert torch.equal(output_sensitivity(sched), s)


def test_step_index_and_unknown_scheduler():
    ts = torch.tensor([999.0, 750.0, 500.0, 250.0])
    assert step_index(ts, torch.full((3,), 750.0)) == 1 and step_index(ts, 260) == 3
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="set_timesteps"):
        output_sensitivity(DDIMScheduler())


def test_end_of_step_offset_is_not_kept_and_fills_leave_the_bare_rule():
    """The controls' fills (w = 1, c = 0) give the bare backend's run exactly; an offset shifts the
    start of the step but the run A the graph keeps excludes it."""
    run, spent = torch.tensor(0.2), torch.tensor(0.5)
    a0, e0 = O.end_of_step(run, spent)
    a1, e1 = O.end_of_step(run, spent, torch.tensor(0.0))
    assert float(a0) == float(a1) == 0.5 and float(e0) == float(e1) == pytest.approx(0.3)
    a2, e2 = O.end_of_step(run + 0.7, spent + 0.7, torch.tensor(0.7))
    assert float(a2) == pytest.approx(0.5) and float(e2) == pytest.approx(0.3)


def _ddim(steps):
    sched = _schedulers()["ddim"]()
    sched.set_timesteps(steps)
    return sched


def _fake_generation(q, sched, shape, rms=1.0):
    """What one generation does to the controller: a call per step (no model)."""
    for t in sched.timesteps:
        q.before_call(t, shape)
        q.controls("default", "cpu")
        q.after_call("default", torch.full((1,), rms))
    return torch.zeros(1, 4)


def test_controls_weight_offset_and_pacing():
    q = QualityTarget(35.0, 0.5)
    c = q.controls("default", "cpu")  # no sampler: the fixed relation through the offset
    assert float(c["output.weight"]) == 1.0
    assert float(c["output.offset"]) == pytest.approx(0.5 - budget_for_psnr(35.0))
    sched = _ddim(10)
    q.bind(sched, guidance_scale=3.0)
    q.before_call(sched.timesteps[0], (2, 1, 8, 8))
    assert float(q.controls("default", "cpu")["output.weight"]) == pytest.approx(UNKNOWN_WEIGHT)
    q.after_call("default", torch.full((2, 4), 0.5))
    q.before_call(sched.timesteps[3], (2, 1, 8, 8))
    s = output_sensitivity(sched).abs()
    w = float(q.controls("default", "cpu")["output.weight"])
    assert w == pytest.approx(UNCALIBRATED_SCALE * float(s[3]) * 0.5 / q.allowed, rel=1e-5)  # batched CFG: factor 1
    assert q.context_factor("uncond") == 2.0 and q.context_factor("cond") == 3.0
    q.after_step("default", torch.tensor(0.1))
    q.after_step("default", torch.tensor(0.05))
    # the steps' errors add in quadrature; the graph approximates while its run A + this step's
    # e <= A + the allowance sqrt((k + 1) / N - sum e^2): c = budget - run - allowance
    sq = 0.1 ** 2 + 0.05 ** 2
    assert q.describe()["predicted_final_error"] == pytest.approx(sq ** 0.5)
    assert float(q.controls("default", "cpu")["output.offset"]) == pytest.approx(0.5 - 0.15 - (0.4 - sq) ** 0.5)
    q.after_step("default", torch.tensor(0.0))  # a full step ends the run, the spent error stays
    assert float(q.controls("default", "cpu")["output.offset"]) == pytest.approx(0.5 - (0.4 - sq) ** 0.5)
    q.after_step("default", torch.tensor(0.7))  # over the pace: nothing is allowed
    assert float(q.controls("default", "cpu")["output.offset"]) == pytest.approx(0.5 - 0.7)


def test_concurrent_requests_pace_their_own_trajectories():
    """Two requests interleaving their steps on one model: each has its own spent error, step and
    output scale (the pacing of one never spends the other's budget)."""
    import contextvars

    import fastcache_fx

    q = QualityTarget(35.0, 0.5)
    sched = _ddim(10)
    q.bind(sched, guidance_scale=1.0)
    a, b = contextvars.copy_context(), contextvars.copy_context()  # two requests' contexts, resumed in turns
    scopes = [fastcache_fx.request("a"), fastcache_fx.request("b")]  # kept: a dropped scope ends its request
    a.run(scopes[0].__enter__)
    b.run(scopes[1].__enter__)

    def step(t, rms=None, spent=None):
        q.before_call(sched.timesteps[t], (1, 1, 8, 8))
        if rms is not None:
            q.after_call("default", torch.full((1, 4), rms))
        if spent is not None:
            q.after_step("default", torch.tensor(spent))
        return q.sq, q.k, q.rms["default"]

    a.run(step, 0, 0.5)
    b.run(step, 0, 2.0)
    got_a = a.run(step, 4, None, 0.3)
    got_b = b.run(step, 1)
    assert got_a == (pytest.approx(0.09), 4, pytest.approx(0.5))
    assert got_b == (0.0, 1, pytest.approx(2.0))
    # read after its request ended (a pipeline call's), stats() describes the latest trajectory
    with fastcache_fx.request("c"):
        step(0, 1.0)
        step(2, None, 0.2)
    assert q.describe()["predicted_final_error"] == pytest.approx(0.2)


def test_calibration_reused_for_the_same_setting_and_redone_for_another():
    q = QualityTarget(35.0, 0.5)
    shape = (2, 1, 8, 8)
    calls = []

    def run_for(sched, shape, guidance=2.0):
        def run():
            q.bind(sched, guidance)
            calls.append(q.full)
            return _fake_generation(q, sched, shape) + (0.0 if q.full else 2 * 10 ** (-37 / 20))  # 37 dB
        return run

    s10 = _ddim(10)
    rec = calibrate(q, run_for(s10, shape))
    assert calls[0] is True and not any(calls[1:]) and rec["generations"] == len(calls)
    assert rec["rounds"][0]["psnr"] == pytest.approx(37.0, abs=0.01)
    assert rec["scale"] == q.uncalibrated_scale()  # 37 dB is in [T + 1, T + 4]: kept
    # the same setting later: the record is used
    run_for(_ddim(10), shape)()
    assert q.scale == rec["scale"] and q.describe()["calibration"] is rec
    # another step count, resolution or guidance: another setting, not calibrated
    for sched, shp, g in ((_ddim(12), shape, 2.0), (_ddim(10), (2, 1, 16, 16), 2.0), (_ddim(10), shape, 4.0)):
        run_for(sched, shp, g)()
        assert q.describe()["calibration"] is None
    # a setting whose cached generation misses the target: the factor grows until it holds
    q2 = QualityTarget(50.0, 0.5)

    def missing():
        q2.bind(s10, 2.0)
        _fake_generation(q2, s10, shape)
        return torch.zeros(1, 4) + (0.0 if q2.full else 0.01 / q2.scale)

    rec2 = calibrate(q2, missing)
    kept = [r for r in rec2["rounds"] if r["scale"] == rec2["scale"]]
    assert rec2["scale"] > q2.uncalibrated_scale() and kept and kept[0]["psnr"] >= 51.0 and rec2["rounds"][0]["psnr"] < 51.0


def test_pipeline_target_shares_one_graph_and_meets_the_final_error_budget():
    """enable_fastcache(model, target_psnr=...) compiles without the target (one graph for every
    target), a custom loop gives its sampler through set_sampler, and the trajectory's predicted
    final error stays within the allowed one; an unmeetable target computes fully with one warning."""
    from diffusers import DDIMScheduler

    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = fastcache_fx.enable_fastcache(model, dynamic=False, target_psnr=25.0)
    assert registry.lookup(model).quality is not None
    x, labels = kw["hidden_states"], kw["class_labels"]
    sched = DDIMScheduler(**COSINE, clip_sample=False)
    sched.set_timesteps(8)
    assert fastcache_fx.set_sampler(compiled, sched, guidance_scale=1.0)
    with torch.no_grad():
        for t in sched.timesteps:
            out = compiled(x, timestep=t.expand(2), class_labels=labels).sample
            x = sched.step(out[:, :4], t, x).prev_sample
    q = fastcache_fx.stats(compiled)["quality"]
    assert q["sampler_known"] and q["steps"] == 8 and 0.0 <= q["predicted_final_error"] <= 1.0 + 1e-5
    fastcache_fx.set_target_psnr(compiled, 40.0)  # no recompile: a control
    assert registry.lookup(model).quality.target == 40.0
    torch._dynamo.reset()
    model2, kw2 = zoo.build("dit")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        compiled2 = fastcache_fx.enable_fastcache(model2, dynamic=False, target_psnr=MAX_TARGET_PSNR + 10)
        with torch.no_grad():
            for i in range(4):
                compiled2(kw2["hidden_states"] + 0.001 * i, timestep=torch.full((2,), 900 - 100 * i),
                          class_labels=kw2["class_labels"])
    assert sum("target_psnr" in str(w.message) for w in got) == 1
    assert fastcache_fx.stats(compiled2)["block_approx_ratio"] == 0.0
