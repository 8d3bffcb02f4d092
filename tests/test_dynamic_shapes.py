"""Dynamic shapes: one graph serves many resolutions and batch sizes, with the cache working and
``stats()`` telling the truth (issue: real pipelines, every resolution)."""

import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from conftest import rel_err


@pytest.fixture(scope="module")
def dit_default_compile():
    """torch.compile's defaults: Dynamo traces symbolic shapes from the second shape on."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    # chi2: repeated inputs give block 0 delta = 0, which the error rule never approximates (no slope)
    compiled = torch.compile(model, backend="fastcache", options={"warmup_steps": 2, "max_consecutive_approx": 2,
                                                                   "decision": "chi2"})
    return model, compiled, kw["class_labels"]


def _trajectory(model, compiled, x, labels, ts=(900, 800, 700, 600)):
    outs = [compiled(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample for t in ts]
    return outs, fastcache_fx.stats(model)


def test_every_resolution_keeps_the_cache(dit_default_compile):
    model, compiled, labels = dit_default_compile
    for i, res in enumerate((8, 16, 24)):
        fastcache_fx.reset(model)
        x = torch.randn(2, 4, res, res)
        outs, st = _trajectory(model, compiled, x, labels)
        # identical inputs: warmup (full, full), then approximated steps, at every resolution
        assert [t["approx"] for t in st["trace"]] == [[False, False]] * 2 + [[True, True]] * 2
        assert st["trajectory"]["default"] == {"steps": 4, "block_approx_ratio": 0.5}
        ref = model(x, timestep=torch.full((2,), 800), class_labels=labels).sample
        assert rel_err(outs[1], ref) < 1e-4  # a full step equals the model
        # the first resolution compiled a static graph; the second one graph with symbolic shapes
        # that the third reuses (no third compile)
        assert st["graphs"] == (1 if i == 0 else 2)
        assert [g["dynamic"] for g in st["per_graph"]] == ([False] if i == 0 else [False, True])
        live = [g for g in st["per_graph"] if g["steps"]]
        assert len(live) == 1 and live[0]["dynamic"] == (i > 0) and live[0]["fallback"] is None
        # state is sized for the call: anchor input + residual of each block, [2, (res/2)^2, 16] fp32
        tokens = (res // 2) ** 2
        assert st["state_bytes_per_block"]["transformer_blocks.0"] == 2 * 2 * tokens * 16 * 4 + 8


def test_shape_change_on_one_graph_never_reuses_state(dit_default_compile):
    model, compiled, labels = dit_default_compile
    fastcache_fx.reset(model)
    x16 = torch.randn(2, 4, 16, 16)
    _trajectory(model, compiled, x16, labels, ts=(900, 800, 700))
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, True]
    # same dynamic graph, other resolution, timestep still decreasing: the state is dropped
    x24 = torch.randn(2, 4, 24, 24)
    compiled(x24, timestep=torch.full((2,), 600), class_labels=labels)
    last = fastcache_fx.stats(model)["trace"][-1]
    assert last["step"] == 0 and last["approx"] == [False, False]
    # other batch sizes: Dynamo specialises batch 1 and makes the batch symbolic at the next
    # new one (3); batch 5 then runs on that graph, and a change 3 -> 5 drops the state too
    graphs = {}
    for b in (1, 3, 5):
        xb, lb = torch.randn(b, 4, 16, 16), torch.arange(b)
        _trajectory(model, compiled, xb, lb, ts=(900, 800, 700))
        out = compiled(xb, timestep=torch.full((b,), 600), class_labels=lb).sample
        st = fastcache_fx.stats(model)
        assert [t["approx"] for t in st["trace"][-4:]] == [[False, False]] * 2 + [[True, True]] * 2
        assert st["trace"][-4]["step"] == 0 and out.shape[0] == b
        graphs[b] = st["graphs"]
    assert graphs[5] == graphs[3]


def test_stats_describe_the_calls_since_reset(dit_default_compile):
    model, compiled, labels = dit_default_compile
    _trajectory(model, compiled, torch.randn(2, 4, 16, 16), labels)
    assert fastcache_fx.stats(model)["steps"] > 0
    fastcache_fx.reset(model)
    st = fastcache_fx.stats(model)
    assert st["steps"] == 0 and st["block_approx_ratio"] == 0.0 and st["trace"] == [] and st["state_bytes"] == 0
    assert st["graphs"] >= 2 and all(g["steps"] == 0 for g in st["per_graph"])
    compiled(torch.randn(2, 4, 16, 16), timestep=torch.full((2,), 900), class_labels=labels)
    assert fastcache_fx.stats(model)["steps"] == 1


def test_dynamic_true_bakes_float_attributes():
    """dynamic=True passes float attributes (norm eps) as tensors; the branches bake them."""
    torch._dynamo.reset()
    model, kw = zoo.build("pixart", batch=1)
    compiled = torch.compile(model, backend="fastcache", dynamic=True, options={"enable_block_approx": False})
    for res in (8, 16, 24):
        x = torch.randn(1, 4, res, res)
        args = dict(kw, hidden_states=x)
        assert rel_err(compiled(**args).sample, model(**args).sample) < 1e-4
    st = fastcache_fx.stats(model)
    # PixArt's patch embedding branches in Python on the sample size (its own base size or not):
    # two graphs, both symbolic, the second serving 16 and 24
    assert st["graphs"] == 2 and all(g["dynamic"] for g in st["per_graph"]) and st["fallback"] == []
    assert [g["steps"] for g in st["per_graph"]] == [1, 2]


def test_fallback_graph_is_reported_and_counts_as_full():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="fastcache")
        compiled(torch.randn(2, 4, 8))
        compiled(torch.randn(2, 4, 8))
    assert len([m for m in w if "fastcache" in str(m.message)]) == 1
    st = fastcache_fx.stats(model)
    assert st["graphs"] == 1 and len(st["fallback"]) == 1 and "no transformer blocks" in st["fallback"][0]
    assert st["per_graph"][0]["kind"] == "fallback" and st["steps"] == 2 and st["block_approx_ratio"] == 0.0
