"""decision="output" (the default): the budget on the transformer's output error (ops.output_error)."""

import math
import statistics
import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.config import MAX_TARGET_PSNR, FastCacheConfig, budget_for_psnr
from fastcache_fx.runtime import registry
from fastcache_fx.runtime.span_choice import balanced_partition, block_errors

from conftest import hooked_dit_call


def _rel(a, b):
    """max over samples of ||a - b|| / ||b||."""
    return float(((a - b).pow(2).flatten(1).sum(1) / b.pow(2).flatten(1).sum(1)).max().sqrt())


def _state(model):
    g = registry.lookup(model).graphs[-1]
    return dict(zip([s.name for s in g.layout.state], g.state_of("default")))


def _eager_step(model, x, labels, t, perturb=None):
    """(per-block (input, output), model output) of one eager call; ``perturb``: a function of the
    last block's (input, output) returning the output to continue with (the tail's replay)."""
    last = len(model.transformer_blocks) - 1
    out, rec = hooked_dit_call(model, x, labels, t, replace={last: perturb} if perturb is not None else None)
    return rec, out


def test_output_gain_equals_eager_recomputation():
    """At each full computation of step >= 1 the graph replays its output layer on Y_L + (Y_hat_L -
    Y_L) (residual reuse of the last block) and keeps g = e_out / e_L, tightened over steps: it
    must equal the same quantities computed eagerly, with the tail run on the perturbed output."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(error_budget=1e-12, warmup_steps=1))
    x, labels = kw["hidden_states"], kw["class_labels"]
    ts = [900, 800, 700]
    xs = [x + 0.05 * i * torch.randn_like(x) for i in range(3)]
    gains = []
    for xi, t in zip(xs, ts):
        compiled(xi, timestep=torch.full((2,), t), class_labels=labels)
        gains.append(float(_state(model)["output.gain"]))
    trace = fastcache_fx.stats(model)["trace"]
    assert not any(any(r["approx"]) for r in trace)  # a tiny budget: every step full
    assert all(r["output_error"] == 0.0 for r in trace)
    assert math.isnan(gains[0])  # step 0: no anchor, nothing measured
    prev = None
    expected = float("nan")
    for i, (xi, t) in enumerate(zip(xs, ts)):
        rec, out = _eager_step(model, xi, labels, t)
        if prev is not None:
            (h0, y0), (h1, y1) = prev[-1], rec[-1]
            y_hat = h1 + (y0 - h0)  # residual reuse of the anchor (the previous full step)
            _, out_p = _eager_step(model, xi, labels, t, perturb=lambda h, y: y + (y_hat - y))
            ratio = _rel(out_p, out) / _rel(y_hat, y1)
            expected = ratio if math.isnan(expected) or ratio > expected else 0.5 * (expected + ratio)
            assert abs(gains[i] - expected) <= 1e-3 * expected
        prev = rec
    assert all(g > 0 for g in gains[1:])


def _slow_trajectory(model, compiled, kw, steps=12):
    """Calls with slowly drifting inputs; returns per call (state before, trace row)."""
    x, labels = kw["hidden_states"], kw["class_labels"]
    rows = []
    for i in range(steps):
        before = {k: v.clone() for k, v in _state(model).items()} if i else None
        xi = x + 0.002 * i * torch.ones_like(x)
        compiled(xi, timestep=torch.full((2,), 950 - 50 * i), class_labels=labels)
        rows.append((before, fastcache_fx.stats(model)["trace"][-1]))
    return rows


def test_accumulated_bound_forces_full_step():
    """Predicted errors of consecutive approximated steps add up; when the next one would pass the
    budget, the step is computed fully (with no consecutive limit in the way), and the predicted
    error of each step is sum over approximated blocks of g k_l delta_l from the state."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    budget = 0.05
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        error_budget=budget, max_consecutive_approx=100, warmup_steps=2))
    rows = _slow_trajectory(model, compiled, kw)
    blocks = rows[0][1]["blocks"]
    run, runs, ended = 0.0, [], 0
    for i, (before, row) in enumerate(rows):
        if before is not None and i >= 2:
            g = float(before["output.gain"])
            want = sum(g * float(before[f"{b}.error_per_delta"]) * d
                       for b, d, a in zip(blocks, row["delta"], row["approx"]) if a)
            assert abs(row["output_error"] - want) <= 1e-4 * max(want, 1e-6)
        if any(row["approx"]):
            run += row["output_error"]
        else:
            if run > 0:
                runs.append(run)
                ended += 1
            run = 0.0
        assert run <= budget * (1 + 1e-5)  # the bound holds over the whole run
    assert ended >= 1 and any(r > 0.5 * budget for r in runs)
    # the errors measured here choose spans (runtime.span_choice): e_l = k_l x median of delta_l
    st = _state(model)
    want = {b: float(st[f"{b}.error_per_delta"]) * statistics.median(r["delta"][i] for _, r in rows[1:])
            for i, b in enumerate(blocks)}
    got = block_errors(model)
    assert got.keys() == want.keys() and all(abs(got[b] - want[b]) <= 1e-6 * want[b] for b in want)
    sizes = fastcache_fx.choose_spans(model, num_spans=2, front_blocks=0)
    assert sizes == tuple(balanced_partition([want[b] for b in blocks], 2)) and sum(sizes) == len(blocks)
    # the per-block rule with the same number approximates every block every step after warmup
    torch._dynamo.reset()
    model2, kw2 = zoo.build("dit")
    per_block = torch.compile(model2, backend=fastcache_fx.FastCacheBackend(
        decision="error", error_budget=budget, max_consecutive_approx=100, warmup_steps=2))
    rows2 = _slow_trajectory(model2, per_block, kw2)
    assert sum(map(sum, (r["approx"] for _, r in rows2))) > sum(map(sum, (r["approx"] for _, r in rows)))


def test_target_psnr_maps_to_budget_and_unmeetable_target_computes_fully():
    assert FastCacheConfig(target_psnr=40).error_budget == pytest.approx(budget_for_psnr(40))
    assert budget_for_psnr(45) < budget_for_psnr(35)  # a higher target, a smaller budget
    for bad, field in ((dict(target_psnr=40, error_budget=0.1), "target_psnr"),
                       (dict(target_psnr=40, decision="chi2"), "target_psnr"), (dict(target_psnr=-3), "target_psnr"),
                       (dict(error_budget=0.0), "error_budget"), (dict(decision="outputs"), "decision")):
        with pytest.raises(ValueError, match=field):
            FastCacheConfig(**bad)
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    with pytest.warns(UserWarning, match="target_psnr"):
        compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(target_psnr=MAX_TARGET_PSNR + 20))
    rows = _slow_trajectory(model, compiled, kw, steps=5)
    assert not any(any(r["approx"]) for _, r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastCacheConfig(target_psnr=MAX_TARGET_PSNR)  # the highest covered target: no warning
