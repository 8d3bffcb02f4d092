"""Residual forecasting (approx="taylor") and the measured-error decision rule (decision="error")."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.ops import forecast as F
from fastcache_fx.runtime import registry
from conftest import rel_err


def _hist(ts, n):
    return torch.tensor(ts, dtype=torch.float32), torch.tensor(n)


def test_order1_is_exact_on_a_linear_residual():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    r = lambda t: a + b * t  # noqa: E731
    h = torch.randn(2, 3, 4)
    ts = [700.0, 910.0]  # full computations unevenly spaced, newest first
    t_hist, n = _hist(ts, 2)
    y = F.approx_taylor(h, [r(t) for t in ts], t_hist, n, torch.tensor(520.0), order=1)
    assert rel_err(y - h, r(520.0)) < 1e-5


def test_order2_is_exact_on_a_quadratic_residual():
    a, b, c = torch.randn(3, 2, 5, 4).unbind(0)
    r = lambda t: a + b * (t / 100) + c * (t / 100) ** 2  # noqa: E731
    h = torch.randn(2, 5, 4)
    ts = [600.0, 750.0, 980.0]
    t_hist, n = _hist(ts, 3)
    y = F.approx_taylor(h, [r(t) for t in ts], t_hist, n, torch.tensor(430.0), order=2)
    assert rel_err(y - h, r(430.0)) < 1e-4
    # order 1 on the same quadratic is not exact (the test above is not vacuous)
    y1 = F.approx_taylor(h, [r(t) for t in ts[:2]], t_hist[:2], torch.tensor(2), torch.tensor(430.0), order=1)
    assert rel_err(y1 - h, r(430.0)) > 1e-3


def test_foca_predictor_corrector_without_a_new_evaluation_is_the_order1_forecast():
    """FoCa (arXiv 2508.16211): a BDF2 predictor and a Heun corrector on the residual trajectory.
    With no model evaluation at the forecast step, the slope there is the last measured one; the
    variable-step BDF2 predictor and Heun's corrector then both land on our order-1 forecast
    (ops.forecast module docstring), on unevenly spaced full computations too."""
    r0, r1, h = torch.randn(3, 2, 5, 4).unbind(0)
    t0, t1, t = 700.0, 910.0, 640.0
    big_h, small_h = t0 - t1, t - t0
    om = small_h / big_h
    slope = (r0 - r1) / big_h
    bdf2 = ((1 + om) ** 2 * r0 - om ** 2 * r1 + (1 + om) * small_h * slope) / (1 + 2 * om)
    heun = r0 + small_h / 2 * (slope + (bdf2 - r0) / small_h)
    ours = F.approx_taylor(h, [r0, r1], *_hist([t0, t1], 2), torch.tensor(t), order=1) - h
    assert rel_err(bdf2, ours) < 1e-5 and rel_err(heun, ours) < 1e-5
    assert rel_err(r0, ours) > 1e-2  # not plain reuse


def test_too_little_history_reuses_the_residual():
    h, r0, r1, r2 = torch.randn(4, 1, 3, 2).unbind(0)
    # one residual of this trajectory: reuse, whatever the older slots hold
    y = F.approx_taylor(h, [r0, r1, r2], *_hist([500.0, 600.0, 700.0], 1), torch.tensor(400.0), order=2)
    assert torch.equal(y, (h + r0).contiguous())
    # two residuals with order 2: the order drops to 1
    w = F.taylor_weights(*_hist([500.0, 600.0, 700.0], 2), torch.tensor(400.0), order=2)
    assert torch.allclose(w, torch.tensor([2.0, -1.0, 0.0]))
    # coinciding timesteps (no slope to take): reuse
    w = F.taylor_weights(*_hist([500.0, 500.0], 2), torch.tensor(400.0), order=1)
    assert torch.equal(w, torch.tensor([1.0, 0.0]))


def test_history_shift_and_restart():
    x = torch.randn(1, 2, 2)
    r0_old, r1_old = torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)
    t_hist, n = _hist([800.0, 900.0], 2)
    full = torch.tensor(False)
    hist, t_new, n_new = F.update_history(full, [x], [x + 5], [r0_old], [[r1_old]], t_hist, n,
                                          torch.tensor(3), torch.tensor(700.0), order=1)
    assert torch.equal(hist[0][0], r0_old) and t_new.tolist() == [700.0, 800.0] and int(n_new) == 2
    # a new trajectory (step 0) restarts the count; an approximated step changes nothing
    _, _, n0 = F.update_history(full, [x], [x], [r0_old], [[r1_old]], t_hist, n, torch.tensor(0),
                                torch.tensor(999.0), order=1)
    hist, t_same, n_same = F.update_history(torch.tensor(True), [x], [x], [r0_old], [[r1_old]], t_hist, n,
                                            torch.tensor(4), torch.tensor(600.0), order=1)
    assert int(n0) == 1 and torch.equal(hist[0][0], r1_old) and t_same.tolist() == [800.0, 900.0]


@pytest.fixture(scope="module")
def taylor_dit():
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        approx="taylor", taylor_order=1, warmup_steps=2, max_consecutive_approx=3, cache_ratio_threshold=0.05))
    return model, compiled, kw


def _hooked_residuals(model, x, labels, ts):
    """Eager block inputs and residuals per step, from forward hooks."""
    rec = []

    def hook(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        rec[-1].append((h.detach().clone(), (out - h).detach().clone()))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in model.transformer_blocks]
    try:
        for t in ts:
            rec.append([])
            model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels)
    finally:
        for hd in handles:
            hd.remove()
    return rec


def test_graph_forecast_equals_eager_extrapolation(taylor_dit):
    """Steps 0 and 1 are computed fully (warmup); step 2 is approximated: every block returns
    H + R_1 + (t - t_1) (R_1 - R_0) / (t_1 - t_0), checked against an eager model whose blocks
    are replaced by that extrapolation of their own eager residuals."""
    model, compiled, kw = taylor_dit
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    ts = [900, 800, 700]
    outs = [compiled(x, timestep=torch.full((2,), t), class_labels=labels).sample for t in ts]
    assert [t["approx"] for t in fastcache_fx.stats(model)["trace"]] == [[False, False]] * 2 + [[True, True]]
    rec = _hooked_residuals(model, x, labels, ts[:2])
    w1 = (ts[2] - ts[0]) / (ts[1] - ts[0])  # Lagrange weight of the newest residual at t=700
    forecast = [w1 * rec[1][i][1] + (1 - w1) * rec[0][i][1] for i in range(2)]

    def replace(i):
        return lambda mod, args, kwargs, out: (args[0] if args else kwargs["hidden_states"]) + forecast[i]

    handles = [b.register_forward_hook(replace(i), with_kwargs=True) for i, b in enumerate(model.transformer_blocks)]
    try:
        ref = model(x, timestep=torch.full((2,), ts[2]), class_labels=labels).sample
    finally:
        for hd in handles:
            hd.remove()
    assert rel_err(outs[2], ref) < 1e-4


def test_nan_in_history_forces_full_compute(taylor_dit):
    model, compiled, kw = taylor_dit
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    for t in (900, 800):
        compiled(x, timestep=torch.full((2,), t), class_labels=labels)
    graph = registry.lookup(model).graphs[-1]
    names = [s.name for s in graph.layout.state]
    assert "transformer_blocks.1.res_hist.0.1" in names and "transformer_blocks.1.hist_t" in names
    state = graph.state_of("default")
    state[names.index("transformer_blocks.1.res_hist.0.1")][0, 0, 0] = float("nan")
    out = compiled(x, timestep=torch.full((2,), 700), class_labels=labels).sample
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, False] and torch.isfinite(out).all()
    # the full computation replaced the history: approximated again next step
    compiled(x, timestep=torch.full((2,), 600), class_labels=labels)
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, True]
    # the memory the forecast costs is reported: 3 [B, N, D] tensors per block for order 1
    per_block = fastcache_fx.stats(model)["state_bytes_per_block"]["transformer_blocks.0"]
    assert per_block >= 3 * x.shape[0] * 16 * 16 * 4


def test_error_estimate_equals_eager_recomputation():
    """decision="error": at each full computation the graph measures e = ||Y_hat - Y|| / ||Y||
    of residual reuse; it must equal the same quantity computed eagerly with hooks."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        decision="error", error_budget=1e-9, warmup_steps=1))  # a tiny budget: every step full
    x, labels = kw["hidden_states"], kw["class_labels"]
    ts = [900, 800, 700]
    xs = [x + 0.05 * i * torch.randn_like(x) for i in range(3)]
    got = []
    for xi, t in zip(xs, ts):
        compiled(xi, timestep=torch.full((2,), t), class_labels=labels)
        g = registry.lookup(model).graphs[-1]
        names = [s.name for s in g.layout.state]
        got.append([float(g.state_of("default")[names.index(f"transformer_blocks.{i}.error")]) for i in range(2)])
    assert not any(any(r) for r in (t["approx"] for t in fastcache_fx.stats(model)["trace"]))
    rec = []
    for xi, t in zip(xs, ts):
        rec += _hooked_residuals(model, xi, labels, [t])
    for step in (1, 2):
        for i in range(2):
            h, r = rec[step][i]
            y = h + r
            y_hat = h + rec[step - 1][i][1]  # residual reuse of the anchor (the previous full step)
            e = ((y_hat - y).pow(2).flatten(1).sum(1) / y.pow(2).flatten(1).sum(1)).max().sqrt()
            assert abs(got[step][i] - float(e)) <= 1e-4 * float(e) + 1e-7
    assert all(v != v for v in got[0])  # step 0: no anchor, nothing measured (NaN)
    # the estimate is e / delta of the first measurement, then the running mean
    delta = [t["delta"] for t in fastcache_fx.stats(model)["trace"]]
    g = registry.lookup(model).graphs[-1]
    names = [s.name for s in g.layout.state]
    k = float(g.state_of("default")[names.index("transformer_blocks.1.error_per_delta")])
    expect = 0.5 * (got[1][1] / delta[1][1] + got[2][1] / delta[2][1])
    assert abs(k - expect) <= 1e-4 * expect


def test_bad_forecast_options_raise():
    with pytest.raises(ValueError, match="taylor_order"):
        fastcache_fx.FastCacheConfig(taylor_order=3)
    with pytest.raises(ValueError, match="decision"):
        fastcache_fx.FastCacheConfig(decision="psnr")
    with pytest.raises(ValueError, match="error_budget"):
        fastcache_fx.FastCacheConfig(error_budget=0.0)


def test_taylor_with_a_float32_timestep():
    """A float32 timestep (flow-matching models pass one) used to reach the cond as a view of the
    graph input (cond refused to compile aliased operands); the state never holds a view of it."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", batch=1)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        approx="taylor", warmup_steps=1, cache_ratio_threshold=10.0, decision="chi2"))
    ts = [torch.tensor([900.0 - 100 * i]) for i in range(4)]
    outs = [compiled(kw["hidden_states"], timestep=t, class_labels=kw["class_labels"]).sample for t in ts]
    ts[-1].fill_(5000.0)  # the caller reuses its buffer: the cached prev_t must not follow it
    assert fastcache_fx.stats(compiled)["block_approx_ratio"] > 0
    assert all(torch.isfinite(o).all() for o in outs)
    prev_t = registry.lookup(compiled).graphs[0].state_of("default")[1]
    assert float(prev_t) == 600.0
