"""Online calibration (statistics accumulated in the compiled graph), low-rank and time-bucketed
maps in the graph: agreement with the offline fit, no graph break, replayed approximations."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.runtime import registry
from fastcache_fx.calibration import RidgeStats, calibrate, collect_stats, fit_calibration, load
from fastcache_fx.ops.decision import accumulate, approx_map, ridge_increments

TS = (900, 800, 700, 600, 400, 300)


def _steps(model, kw, ts=TS):
    with torch.no_grad():
        return [model(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample for t in ts]


def _eager_with_maps(model, kw, t, maps_of, kind="linear", rank=None, buckets=1):
    """One eager call with every block replaced by ``approx_map`` (anchors unused for linear)."""
    def replace(name):
        def fn(mod, args, kwargs, out):
            h = kwargs.get("hidden_states", args[0] if args else None)
            return approx_map(h, None, None, maps_of(name), torch.tensor(float(t)), None, kind=kind, rank=rank,
                              buckets=buckets, timestep_max=1000.0)
        return fn
    handles = [b.register_forward_hook(replace(f"transformer_blocks.{i}"), with_kwargs=True)
               for i, b in enumerate(model.transformer_blocks)]
    try:
        with torch.no_grad():
            return model(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def online():
    torch.manual_seed(0)
    model, kw = zoo.build("dit", num_layers=2)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "approx": "linear", "calibration": "online", "time_buckets": 2, "refit_every": 2,
        "online_min_samples": 64, "enable_block_approx": False})
    _steps(compiled, kw)
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    rt = registry.lookup(model).graphs[-1]
    yield model, kw, compiled, rt, breaks
    fastcache_fx.reset(model)
    torch._dynamo.reset()


def test_online_adds_no_graph_break(online):
    _, _, _, rt, breaks = online
    assert breaks == {}
    assert rt.online is not None and len(rt.layout.accums) == 2 * 6  # 2 blocks x 1 stream x 6 statistics


def test_online_and_offline_fits_agree(online):
    model, kw, _, rt, _ = online
    cs = collect_stats(model, lambda m: _steps(m, kw), time_buckets=2)
    for k, calls in ((0, 2), (1, 4)):  # t = 400, 300 -> bucket 0; 900..600 -> bucket 1
        off, onl = cs.stats[("transformer_blocks.1", 0, k)], rt.online.stats("transformer_blocks.1", 0, k)
        assert onl.n == off.n == calls * 2 * 16  # batch 2 x 16 tokens per full computation
        for a in ("sx", "sy", "xtx", "xty"):
            ref = getattr(off, a)
            assert torch.allclose(getattr(onl, a), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())), a
        assert abs(onl.yty - off.yty) <= 1e-5 * off.yty
    rt.online.refit(rt.weights, force=True)
    cal = fit_calibration(cs)
    for name in ("transformer_blocks.0.weight.0", "transformer_blocks.1.bias.0"):
        assert rt.weights[name].shape == cal.tensors[name].shape
        assert torch.allclose(rt.weights[name], cal.tensors[name], atol=2e-3), name
    assert rt.weights["transformer_blocks.0.ready"].tolist() == [1.0, 1.0]


def test_online_refits_on_schedule_and_survives_reset(online):
    model, kw, compiled, rt, _ = online
    on = rt.online
    assert on.refits >= 2 and on.refit_seconds > 0
    before = on.accum["transformer_blocks.0.n.0"].clone()
    fastcache_fx.reset(model)  # forgets the cache, not what was learned
    assert torch.equal(on.accum["transformer_blocks.0.n.0"], before)
    _steps(compiled, kw, ts=(900,))
    assert on.accum["transformer_blocks.0.n.0"][1] == before[1] + 32


def test_online_maps_are_used_when_approximating(online):
    """Replay: full step, then forced approximations; outputs equal the eager map application."""
    model, kw, compiled, rt, _ = online
    rt.online.refit(rt.weights, force=True)
    fastcache_fx.reset(model)
    with fastcache_fx.replay_decisions(model, [[False, False], [True, True], [True, True]]):
        outs = _steps(compiled, kw, ts=(900, 800, 300))
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, True]
    for t, out in ((800, outs[1]), (300, outs[2])):
        ref = _eager_with_maps(model, kw, t, lambda n: [rt.weights[f"{n}.weight.0"], rt.weights[f"{n}.bias.0"]],
                               buckets=2)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_low_rank_time_bucketed_file_in_graph(tmp_path):
    torch.manual_seed(1)
    model, kw = zoo.build("dit", num_layers=2)
    path = tmp_path / "r4k2.safetensors"
    cal = calibrate(model, lambda m: _steps(m, kw), out=path, rank=4, time_buckets=2)
    back = load(path)  # save/load round trip
    assert back.metadata == cal.metadata and all(torch.equal(back.tensors[k], v) for k, v in cal.tensors.items())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "approx": "linear", "calibration": str(path), "rank": 4, "time_buckets": 2,
        "cache_ratio_threshold": 1e6, "warmup_steps": 1, "max_consecutive_approx": 100})
    outs = _steps(compiled, kw, ts=(900, 800, 300))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, True]
    for t, out in ((800, outs[1]), (300, outs[2])):
        ref = _eager_with_maps(model, kw, t, lambda n: [cal.tensors[f"{n}.{k}.0"] for k in ("u", "v", "bias")],
                               rank=4, buckets=2)
        assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    fastcache_fx.reset(model)
    torch._dynamo.reset()


def test_residual_linear_increments_match_offline_pairs():
    """In-graph increments for residual_linear use (H - H_anchor, R - R_anchor), the offline pairs."""
    g = torch.Generator().manual_seed(4)
    h_a, h = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    y_a, y = h_a + torch.randn(2, 5, 8, generator=g), h + torch.randn(2, 5, 8, generator=g)
    inc = ridge_increments(h, y, h_a, y_a - h_a, kind="residual_linear")
    st = RidgeStats(8, 8)
    dx = h - h_a
    st.add(dx, (y - y_a) - dx)
    acc = [torch.zeros((3,) + tuple(i.shape), dtype=torch.float64) for i in inc]
    acc = accumulate(acc, inc, torch.tensor(True), torch.tensor(500.0), 3, 1000.0)  # bucket 1 of 3
    onl = RidgeStats.from_tensors(*(a[1] for a in acc))
    assert onl.n == st.n and torch.allclose(onl.xty, st.xty, atol=1e-4) and torch.allclose(onl.xtx, st.xtx, atol=1e-4)
    assert all(float(a[0].abs().sum()) == 0 and float(a[2].abs().sum()) == 0 for a in acc)
    # a NaN increment is masked out entirely
    bad = [i * float("nan") for i in inc]
    acc2 = accumulate(acc, bad, torch.tensor(False), torch.tensor(500.0), 3, 1000.0)
    assert all(torch.equal(a, b) for a, b in zip(acc, acc2))


def test_config_fields_validated():
    from fastcache_fx import FastCacheConfig

    for field, bad in (("rank", 0), ("time_buckets", 0), ("refit_every", 0), ("online_min_samples", -1), ("rank", 2.5)):
        with pytest.raises(ValueError, match=f"FastCacheConfig.{field}"):
            FastCacheConfig(**{field: bad})
    assert FastCacheConfig(calibration="online", approx="linear", rank=16, time_buckets=4).calibration == "online"
