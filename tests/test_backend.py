"""The fastcache backend end to end on tiny real diffusers models (Inductor on CPU)."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from conftest import rel_err

FAMILY_TIMESTEPS = {"dit": [900, 700, 500], "pixart": [900, 700, 500], "sd3": [900.0, 700.0, 500.0],
                    "flux": [0.9, 0.7, 0.5]}


@pytest.mark.parametrize("family,batch", [(f, b) for f in ("dit", "pixart", "sd3", "flux") for b in (1, 2)])
def test_disabled_approximation_equals_eager_fullgraph(family, batch):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, kw = zoo.build(family, batch=batch)
    compiled = torch.compile(model, backend="fastcache", fullgraph=True, options={"enable_block_approx": False})
    for t in FAMILY_TIMESTEPS[family]:
        kw["timestep"] = torch.full_like(kw["timestep"], t)
        kw["hidden_states"] = kw["hidden_states"] + 0.01 * torch.randn_like(kw["hidden_states"])
        assert rel_err(compiled(**kw).sample, model(**kw).sample) < 1e-4
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    s = fastcache_fx.stats(model)
    assert s["steps"] == 3 and s["block_approx_ratio"] == 0.0 and s["graphs"] == 1
    assert len(s["blocks"]) == len(s["trace"][0]["delta"])


@pytest.fixture(scope="module")
def dit_compiled():
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "cache_ratio_threshold": 0.05, "warmup_steps": 2, "max_consecutive_approx": 2})
    return model, compiled, kw


def _run(compiled, x, t, labels):
    return compiled(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample


def _start_trajectory(model, compiled, x, labels):
    """reset, then three identical steps: warmup (full, full) and one approximated step."""
    fastcache_fx.reset(model)
    for t in [900, 800, 700]:
        _run(compiled, x, t, labels)


def _approx_trace(model, last=None):
    tr = fastcache_fx.stats(model)["trace"]
    return [t["approx"] for t in (tr if last is None else tr[-last:])]


def test_scripted_decision_trace(dit_compiled):
    model, compiled, kw = dit_compiled
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    before = len(fastcache_fx.stats(model)["trace"])
    outs = []
    for i, t in enumerate([900, 800, 700, 600, 500]):  # identical inputs
        outs.append(_run(compiled, x, t, labels))
    _run(compiled, x + 3.0 * torch.randn_like(x), 400, labels)  # a large change
    trace = fastcache_fx.stats(model)["trace"][before:]
    got = [t["approx"] for t in trace]
    F, T = [False, False], [True, True]
    # warmup 2 -> full, full; then approx twice (max_consecutive_approx=2), full, large change -> full
    assert got == [F, F, T, T, F, F]
    assert [t["step"] for t in trace] == [0, 1, 2, 3, 4, 5]
    # identical inputs: block 0 sees exactly its anchor; block 1 sees H + R_anchor (= Y_anchor up to rounding)
    assert trace[2]["delta"][0] == 0.0 and trace[2]["delta"][1] < 1e-6 and trace[5]["delta"][0] > 0.05
    st = fastcache_fx.stats(model)
    assert 0 < st["block_approx_ratio"] < 1 and set(st["per_block"]) == {"transformer_blocks.0", "transformer_blocks.1"}


def test_reset_and_new_trajectory(dit_compiled):
    model, compiled, kw = dit_compiled
    x, labels = kw["hidden_states"], kw["class_labels"]
    for t in [900, 800, 700]:
        _run(compiled, x, t, labels)
    assert _approx_trace(model, 1) == [[True, True]]
    fastcache_fx.reset(model)
    _run(compiled, x, 600, labels)
    assert _approx_trace(model, 1) == [[False, False]]
    # the timestep going up starts a new trajectory: full during warmup
    for t in [500, 400]:
        _run(compiled, x, t, labels)
    _run(compiled, x, 999, labels)
    assert fastcache_fx.stats(model)["trace"][-1]["step"] == 0
    assert _approx_trace(model, 1) == [[False, False]]


def test_contexts_have_their_own_state(dit_compiled):
    model, compiled, kw = dit_compiled
    x, labels = kw["hidden_states"], kw["class_labels"]
    _start_trajectory(model, compiled, x, labels)
    with fastcache_fx.cache_context("uncond"):
        _run(compiled, x, 900, labels)  # first step of this context: full
    assert fastcache_fx.stats(model)["trace"][-1]["context"] == "uncond"
    assert _approx_trace(model, 1) == [[False, False]]
    _run(compiled, x, 600, labels)  # back in the default context, which continues its trajectory
    assert fastcache_fx.stats(model)["trace"][-1]["step"] == 3


def test_nan_input_is_never_cached(dit_compiled):
    model, compiled, kw = dit_compiled
    x, labels = kw["hidden_states"], kw["class_labels"]
    _start_trajectory(model, compiled, x, labels)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    _run(compiled, bad, 600, labels)
    assert _approx_trace(model, 1) == [[False, False]]
    # the anchor is still the clean one: identical clean input is approximated again
    _run(compiled, x, 500, labels)
    assert _approx_trace(model, 1) == [[True, True]]


def test_batch_change_recomputes(dit_compiled):
    model, compiled, kw = dit_compiled
    x, labels = kw["hidden_states"], kw["class_labels"]
    _start_trajectory(model, compiled, x, labels)
    x4, l4 = torch.cat([x, x]), torch.cat([labels, labels])
    out4 = _run(compiled, x4, 600, l4)
    assert _approx_trace(model, 1) == [[False, False]]
    assert rel_err(out4, model(x4, timestep=torch.full((4,), 600), class_labels=l4).sample) < 1e-4
    _run(compiled, x, 500, labels)  # back to batch 2: the old state is stale, recompute
    assert _approx_trace(model, 1) == [[False, False]]


def test_two_models_never_share_state(dit_compiled):
    model, compiled, kw = dit_compiled
    other, _ = zoo.build("dit", seed=1)
    assert fastcache_fx.stats(other)["steps"] == 0
    fastcache_fx.reset(other)  # no effect on the first model
    assert fastcache_fx.stats(model)["steps"] > 0


def test_linear_without_calibration_falls_back_to_residual():
    with pytest.warns(UserWarning, match="falling back to approx='residual'"):
        from fastcache_fx import approx
        from fastcache_fx.config import FastCacheConfig

        assert approx.resolve(FastCacheConfig(approx="linear")).name == "residual"


def test_backend_is_registered_as_entry_point():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("fastcache").__name__ == "fastcache_backend"


def test_enable_fastcache_follows_diffusers_cache_context():
    torch._dynamo.reset()
    model, kw = zoo.build("flux")  # Flux inherits diffusers' CacheMixin (cache_context)
    compiled = fastcache_fx.enable_fastcache(model, cache_ratio_threshold=0.05)
    for t in (0.9, 0.8):
        with model.cache_context("cond"):
            compiled(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})
        with model.cache_context("uncond"):
            out = compiled(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample
    trace = fastcache_fx.stats(compiled)["trace"]
    assert [t["context"] for t in trace] == ["cond", "uncond", "cond", "uncond"]
    assert [t["step"] for t in trace] == [0, 0, 1, 1]  # one trajectory per context
    assert rel_err(out, model(**{**kw, "timestep": torch.full_like(kw["timestep"], 0.8)}).sample) < 1e-4


def test_reference_previous_adds_previous_input_state():
    from fastcache_fx.config import FastCacheConfig
    from fastcache_fx.passes.block_cache import apply_block_cache
    from test_blocks import _hand_written_graph

    _, res = apply_block_cache(_hand_written_graph(), FastCacheConfig(reference="previous"))
    assert "blocks.0.previous_in.0" in [s.name for s in res.state]


def test_replay_decisions_forces_the_trace(dit_compiled):
    model, compiled, kw = dit_compiled
    x, labels = kw["hidden_states"], kw["class_labels"]
    fastcache_fx.reset(model)
    rows = [[True, True], [False, True], [True, False], [True, True], [False, False]]
    ts = [900, 800, 700, 600, 500]
    with fastcache_fx.replay_decisions(model, rows) as replay:
        # large changes every step: live decisions would never approximate
        outs = [_run(compiled, x + 2.0 * i * torch.randn_like(x), t, labels) for i, t in enumerate(ts)]
    assert replay.used == 5 and all(torch.isfinite(o).all() for o in outs)
    # step 0 has no anchor: forced approximation falls back to a full computation
    assert _approx_trace(model, 5) == [[False, False]] + rows[1:]
    _run(compiled, x + 9.0, 400, labels)  # after the with block: live again (large change -> full)
    assert _approx_trace(model, 1) == [[False, False]]
    # a 2-column trace drives the model by proportional column mapping; bad traces are refused
    with pytest.raises(ValueError, match="approx"):
        with fastcache_fx.replay_decisions(model, [True, False]):
            pass


def test_models_sharing_a_compiled_graph_keep_their_own_state():
    """backend="fastcache" is one function: Dynamo reuses model A's compiled graph for model B of the
    same class. Each model still gets its own cache state, trajectory and statistics."""
    torch._dynamo.reset()
    models = [zoo.build("dit", seed=i)[0] for i in range(2)]
    # chi2: repeated inputs give block 0 delta = 0, which the error rule never approximates (no slope)
    compiled = [torch.compile(m, backend="fastcache", options={"warmup_steps": 2, "max_consecutive_approx": 5,
                                                                       "decision": "chi2"})
                for m in models]
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    for i, t in enumerate((900, 800, 700, 600)):
        for m, c in zip(models, compiled):  # interleaved calls
            out = c(x, timestep=torch.full((2,), t), class_labels=labels).sample
            if i < 2:  # warmup: computed fully, each model with its own weights
                assert rel_err(out, m(x, timestep=torch.full((2,), t), class_labels=labels).sample) < 1e-4
    for m in models:
        st = fastcache_fx.stats(m)
        assert [t["step"] for t in st["trace"]] == [0, 1, 2, 3] and st["graphs"] == 1
        assert [t["approx"] for t in st["trace"]] == [[False, False]] * 2 + [[True, True]] * 2


def test_pass_order_is_checked():
    """A pipeline in the wrong order fails with a message naming the passes, before any rewrite."""
    from fastcache_fx.backend import PASSES, check_order

    check_order(PASSES)
    by = {p.name: p for p in PASSES}
    with pytest.raises(ValueError, match="'token_merge' must run before \\['block_cache'\\]"):
        check_order((by["block_cache"], by["token_merge"]))
    with pytest.raises(ValueError, match="'online_calibration' needs \\['block_cache'\\]"):
        check_order((by["online_calibration"], by["block_cache"]))
