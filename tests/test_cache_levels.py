"""The step and span cache levels (passes/spans.py): one decision and one cond per run of blocks."""

import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.compat import Target, check
from fastcache_fx.config import FastCacheConfig
from fastcache_fx.debug.heatmap import decision_matrices
from fastcache_fx.passes.block_cache import apply_block_cache
from fastcache_fx.passes.spans import span_bounds
from fastcache_fx.runtime import registry
from fastcache_fx.runtime.span_choice import balanced_partition
from fastcache_fx.runtime.stats import block_share

from conftest import dynamo_graph, hooked_dit_call, rel_err

LAYERS = 4


def _conds(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond)


def _hooked(model, x, labels, t, replace=None):
    """(output, [(input, output)] per block) of one eager call; ``replace``: {index: fn(input) ->
    output} swaps blocks' outputs."""
    return hooked_dit_call(model, x, labels, t, {i: (lambda h, y, f=f: f(h)) for i, f in (replace or {}).items()})


@pytest.fixture(scope="module")
def step_dit():
    """A 4-block DiT at the step level, chi-square rule (no estimate to learn first)."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=LAYERS)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        cache_level="step", decision="chi2", cache_ratio_threshold=0.2, warmup_steps=1, max_consecutive_approx=2))
    return model, compiled, kw


def test_step_level_approximates_the_whole_stack_and_recomputes_on_a_jump(step_dit):
    """Block 0 is computed every step; blocks 1-3 are one span with one decision: approximated, the
    model returns block 0's output plus the span's residual of the last full step (checked against
    an eager model with hooks); a large change of the input computes the whole stack."""
    model, compiled, kw = step_dit
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    outs = [compiled(x, timestep=torch.full((2,), t), class_labels=labels).sample for t in (900, 890, 880)]
    jump = compiled(x + 3.0 * torch.randn_like(x), timestep=torch.full((2,), 870), class_labels=labels).sample
    st = fastcache_fx.stats(model)
    assert [t["approx"] for t in st["trace"]] == [[False], [True], [True], [False]]
    assert st["blocks"] == ["transformer_blocks.0", "transformer_blocks.1-3"]
    assert st["per_graph"][-1]["conds_per_step"] == 1 and st["per_graph"][-1]["cache_level"] == "step"
    assert st["per_block"]["transformer_blocks.0"] == 0.0
    # 2 approximated steps of 3 blocks, of 4 steps x 4 blocks
    assert st["block_approx_ratio"] == pytest.approx(6 / 16)
    assert block_share(st["trace"]) == pytest.approx(6 / 16)  # what the demo and compare.py report
    assert st["trajectory"]["default"]["block_approx_ratio"] == pytest.approx(6 / 16)
    # the heat map: a row per region (the front block, the span), the span's decisions per step
    mats = decision_matrices(st)
    assert mats["blocks"] == ["transformer_blocks.0", "transformer_blocks.1-3"]
    assert mats["approx"][1].tolist() == [False, True, True, False] and not mats["approx"][0].any()
    assert mats["covered"].all()  # the front block ran every step, outside the cond
    _, rec = _hooked(model, x, labels, 900)
    span_res = rec[3][1] - rec[1][0]  # the span's residual at the anchor step
    ref, _ = _hooked(model, x, labels, 890, replace={1: lambda h: h + span_res, 2: lambda h: h, 3: lambda h: h})
    assert rel_err(outs[1], ref) < 1e-5
    full, _ = _hooked(model, x, labels, 900)
    assert rel_err(outs[0], full) < 1e-5
    assert torch.isfinite(jump).all()


def test_step_level_state_is_bounded(step_dit):
    """Per context: one anchor input and one residual of the stream (not 2 per block), plus scalars."""
    model, compiled, kw = step_dit
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    for t in (900, 890):
        compiled(x, timestep=torch.full((2,), t), class_labels=labels)
    st = fastcache_fx.stats(model)
    stream = 2 * 16 * 16 * 4  # [B, N, D] float32
    per_ctx = st["state_bytes_per_context"]["default"]
    assert 2 * stream <= per_ctx <= 2 * stream + 64 * LAYERS


def test_one_cond_per_step_and_spans_cover_the_blocks():
    """The rewritten graph holds one cond at the step level and ``num_spans`` at the span level; the
    front / back blocks stay outside; across two block lists (Flux) the span is still one region."""
    model, kw = zoo.build("dit", num_layers=6)
    gm, _ = dynamo_graph(model, kw)
    for opts, conds, blocks in (({"cache_level": "block"}, 6, None),
                                ({"cache_level": "step"}, 1, ["transformer_blocks.1-5"]),
                                ({"cache_level": "step", "front_blocks": 2, "back_blocks": 1}, 1,
                                 ["transformer_blocks.2-4"]),
                                ({"cache_level": "step", "front_blocks": 0}, 1, ["transformer_blocks.0-5"]),
                                ({"cache_level": "span", "num_spans": 2}, 2,
                                 ["transformer_blocks.1-3", "transformer_blocks.4-5"]),
                                ({"cache_level": "span", "span_sizes": (1, 4)}, 2,
                                 ["transformer_blocks.1", "transformer_blocks.2-5"]),
                                ({"cache_level": "span", "span_sizes": (2, 2)}, 2,  # 4 of 5: equal depths
                                 ["transformer_blocks.1-3", "transformer_blocks.4-5"]),
                                ({"cache_level": "step", "front_blocks": 4, "back_blocks": 2}, 0, [])):
        new, res = apply_block_cache(gm, FastCacheConfig(**opts))
        assert _conds(new) == conds and len(res.blocks) == conds
        if blocks is not None:
            assert res.blocks == blocks and sum(res.sizes) + len(res.uncached) == 6
        assert ("span_sizes" in res.span_reason) == (opts.get("span_sizes") == (2, 2))
        assert ("leave no block" in res.span_reason) == (conds == 0)
    model, kw = zoo.build("flux", num_layers=2, batch=1)
    gm, _ = dynamo_graph(model, kw)
    new, res = apply_block_cache(gm, FastCacheConfig(cache_level="step"))
    assert _conds(new) == 1 and res.sizes == [3] and res.span_reason == ""
    assert res.blocks == ["transformer_blocks.1-single_transformer_blocks.1"]


def test_span_bounds_and_spans_from_errors():
    cfg = FastCacheConfig(cache_level="span", num_spans=3, front_blocks=1, back_blocks=1)
    assert span_bounds(8, cfg) == [(1, 3), (3, 5), (5, 7)]
    assert span_bounds(6, FastCacheConfig(cache_level="span", span_sizes=(1, 4))) == [(1, 2), (2, 6)]
    # spans of balanced expected error: one hard block gets a span of its own
    assert balanced_partition([8.0, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_partition([5.0, 1, 1, 1, 1, 5], 2) == [3, 3]
    assert balanced_partition([1.0, 1, 1], 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="num_spans"):
        balanced_partition([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="span_sizes"):
        FastCacheConfig(cache_level="step", span_sizes=(2, 3))
    with pytest.raises(ValueError, match="span_sizes"):
        FastCacheConfig(cache_level="span", span_sizes=(2, 0))
    assert FastCacheConfig(cache_level="span", span_sizes=[2, 1, 2]).num_spans == 3
    with pytest.raises(ValueError, match="state_dtype"):
        FastCacheConfig(state_dtype="float16")
    with pytest.raises(ValueError, match="choose_spans"):
        fastcache_fx.choose_spans(zoo.build("dit", num_layers=2)[0])
    assert span_bounds(2, cfg) == []  # nothing left between front and back
    assert span_bounds(4, FastCacheConfig(cache_level="step")) == [(1, 4)]


@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_span_taylor_forecast_equals_eager_extrapolation(state_dtype):
    """approx="taylor" at the step level forecasts the span's residual: with two full steps in its
    history the approximated step returns block 0's output + R_1 + (t - t_1)(R_1 - R_0)/(t_1 - t_0)
    of the span's residuals; with one (too little history) it reuses R_0; a NaN in the history
    forces a full step. ``state_dtype="bfloat16"`` (float32 model): the same with the residuals
    rounded to bfloat16, and the stream-sized state is bfloat16."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=LAYERS)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        cache_level="step", approx="taylor", decision="chi2", cache_ratio_threshold=0.5, warmup_steps=1,
        max_consecutive_approx=1, state_dtype=state_dtype))
    stored = (lambda r: r.to(torch.bfloat16).float()) if state_dtype else (lambda r: r)
    x, labels = kw["hidden_states"], kw["class_labels"]
    ts = [900, 800, 700, 600]
    outs = [compiled(x, timestep=torch.full((2,), t), class_labels=labels).sample for t in ts]
    assert [t["approx"] for t in fastcache_fx.stats(model)["trace"]] == [[False], [True], [False], [True]]
    res = {}
    for t in (900, 700):
        _, rec = _hooked(model, x, labels, t)
        res[t] = stored(rec[3][1] - rec[1][0])
    keep = {2: lambda h: h, 3: lambda h: h}
    reuse, _ = _hooked(model, x, labels, 800, replace={1: lambda h: h + res[900], **keep})
    assert rel_err(outs[1], reuse) < 1e-5  # one residual in the history: plain reuse
    w = (600 - 900) / (700 - 900)  # Lagrange weight of the newest residual at t = 600
    forecast = w * res[700] + (1 - w) * res[900]
    ref, _ = _hooked(model, x, labels, 600, replace={1: lambda h: h + forecast, **keep})
    assert rel_err(outs[3], ref) < 1e-4
    # a NaN in the span's residual history: the next would-be approximated step is computed fully
    fastcache_fx.reset(model)
    for t in ts[:3]:
        compiled(x, timestep=torch.full((2,), t), class_labels=labels)
    g = registry.lookup(model).graphs[-1]
    names = [s.name for s in g.layout.state]
    hist = [n for n in names if n.startswith("transformer_blocks.1-3.res_hist")]
    assert hist
    big = {s.dtype for s in g.layout.state if len(s.shape) == 3}
    assert big == {torch.bfloat16 if state_dtype else torch.float32}
    g.state_of("default")[names.index(hist[-1])][0, 0, 0] = float("nan")
    out = compiled(x, timestep=torch.full((2,), 600), class_labels=labels).sample
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [False] and torch.isfinite(out).all()


def test_levels_refuse_what_they_cannot_run():
    with pytest.raises(ValueError, match="cache_level"):
        FastCacheConfig(cache_level="layer")
    with pytest.raises(ValueError, match="num_spans"):
        FastCacheConfig(cache_level="span", num_spans=0)
    with pytest.raises(ValueError, match="front_blocks"):
        FastCacheConfig(front_blocks=-1)
    with pytest.raises(ValueError, match="FastCacheConfig.approx"):
        FastCacheConfig(cache_level="step", approx="linear")
    with pytest.raises(ValueError, match="FastCacheConfig.calibration"):
        FastCacheConfig(cache_level="span", calibration="online")
    with pytest.raises(ValueError, match="cache_level.*whole transformer"):
        check(FastCacheConfig(cache_level="step"), Target(block_graph=True))
    with pytest.raises(ValueError, match="enable_token_merge"):
        check(FastCacheConfig(cache_level="step", enable_token_merge=True), Target())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check(FastCacheConfig(cache_level="step"), Target(dynamic=True, collectives=True)).cache_level == "step"


def test_explain_names_the_level_and_its_spans():
    from fastcache_fx.debug.explain import explain

    model, kw = zoo.build("dit", num_layers=LAYERS)
    text = explain(model, config={"cache_level": "step", "state_dtype": "bfloat16"}, **kw).text(diff=False)
    assert "cache_level=step: 1 cond(s) per step, over transformer_blocks.1-3 (3 blocks)" in text
    assert "per span and CFG context, stored in bfloat16" in text
    assert "computed every step: transformer_blocks.0" in text and "per span and CFG context" in text


def test_step_level_follows_resolutions_with_default_compile():
    """torch.compile's default arguments: the second resolution gets a graph with symbolic shapes,
    the step level's span works on it, and a new resolution never reuses the span's state."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=3)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
        cache_level="step", decision="chi2", cache_ratio_threshold=0.2, warmup_steps=1))
    labels = kw["class_labels"]
    for res in (8, 16, 24):
        x = torch.randn(2, 4, res, res)
        outs = [compiled(x, timestep=torch.full((2,), t), class_labels=labels).sample for t in (900, 890, 880)]
        st = fastcache_fx.stats(model)
        # a new resolution starts computing fully (the state was sized for the last call)
        assert [t["approx"] for t in st["trace"][-3:]] == [[False], [True], [True]]
        ref = model(x, timestep=torch.full((2,), 900), class_labels=labels).sample
        assert rel_err(outs[0], ref) < 1e-4
        tokens = (res // 2) ** 2
        assert st["per_graph"][-1]["state_bytes"] <= 2 * 2 * tokens * 16 * 4 + 64  # the graph serving it
    assert [g["dynamic"] for g in st["per_graph"]] == [False, True]
    assert all(g["conds_per_step"] == 1 for g in st["per_graph"])
