"""Token-merge pyramid (passes/token_merge.py): merge/unmerge algebra, the NumPy reference of
the importance-weighted average, linear cost with windows, and compiled runs on a tiny DiT."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastcache_fx
from fastcache_fx import FastCacheConfig, zoo
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.passes.graph_utils import node_value
from fastcache_fx.ops.token_merge import from_windows, local_ctm, merge_tokens, to_windows, unmerge_add
from fastcache_fx.passes.token_merge import apply_token_merge

GRID = (8, 8, 4, 4)  # 8 x 8 tokens, 4 x 4 windows: G = 4 windows of W = 16 tokens


def _merge(y, clusters, step=1, prev=None, grid=GRID, groups=4, k=5, lam=1.0):
    prev = torch.zeros_like(y) if prev is None else prev
    return merge_tokens(y, prev, torch.tensor(step), grid=grid, groups=groups, clusters=clusters, k=k, lam=lam)


def test_windows_round_trip():
    x = torch.randn(2, 64, 5)
    xw = to_windows(x, GRID, 4)
    assert xw.shape == (2, 4, 16, 5)
    # window 0 holds the top-left 4 x 4 tokens of the row-major grid
    assert torch.equal(xw[:, 0, :4], x[:, 0:4]) and torch.equal(xw[:, 0, 4:8], x[:, 8:12])
    assert torch.equal(from_windows(xw, GRID), x)


def test_identical_tokens_merge_losslessly():
    # every window holds 3 distinct tokens, repeated; 4 clusters per window are enough
    torch.manual_seed(1)
    distinct = torch.randn(2, 4, 3, 8)
    pick = torch.randint(0, 3, (16,))
    pick[:3] = torch.tensor([0, 1, 2])
    xw = distinct[:, :, pick]  # [2, 4, 16, 8]
    y = from_windows(xw, GRID)
    merged, assign, _ = _merge(y, clusters=4)
    assert merged.shape == (2, 16, 8)
    back = unmerge_add(torch.zeros_like(y), merged, torch.zeros_like(merged), assign, grid=GRID, groups=4)
    torch.testing.assert_close(back, y, rtol=1e-6, atol=1e-6)


def test_merge_ratio_one_is_identity_function():
    torch.manual_seed(2)
    y = torch.randn(2, 64, 8)
    merged, assign, prev = _merge(y, clusters=16)
    assert torch.equal(prev, y)
    # every token is its own cluster: unpooling the merged tokens gives the tokens back
    back = unmerge_add(torch.zeros_like(y), merged, torch.zeros_like(merged), assign, grid=GRID, groups=4)
    torch.testing.assert_close(back, y, rtol=1e-6, atol=1e-6)
    assert sorted(assign[0, 0].tolist()) == list(range(16))


def test_unchanged_coarse_stage_returns_its_input_exactly():
    torch.manual_seed(3)
    z = torch.randn(2, 64, 8)
    merged, assign, _ = _merge(z, clusters=4)
    assert torch.equal(unmerge_add(z, merged, merged, assign, grid=GRID, groups=4), z)


def _numpy_reference(x, motion, k, lam):
    """Importance S per token of one window [W, D] (loops over tokens, float64)."""
    w = x.shape[0]
    d2 = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(w)] for i in range(w)])
    scale = d2.sum() / (w * (w - 1))
    dn = d2 / scale
    rho = np.empty(w)
    for i in range(w):
        others = np.sort(np.delete(dn[i], i))[:k]
        rho[i] = np.exp(-others.mean())
    return rho * (1 + lam * motion), dn


def test_importance_and_weighted_average_match_numpy():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 6, dtype=torch.float64)
    motion = torch.rand(2, 3, 16, dtype=torch.float64)
    merged, assign, s, centres = local_ctm(x, motion, clusters=5, k=3, lam=0.7)
    assert merged.shape == (2, 3, 5, 6) and assign.shape == (2, 3, 16)
    for b in range(2):
        for g in range(3):
            xn, a = x[b, g].numpy(), assign[b, g].numpy()
            s_ref, dn = _numpy_reference(xn, motion[b, g].numpy(), k=3, lam=0.7)
            np.testing.assert_allclose(s[b, g].numpy(), s_ref, rtol=1e-5)
            assert set(a.tolist()) == set(range(5))  # no empty cluster
            cs = centres[b, g].tolist()
            assert [a[c] for c in cs] == list(range(5))  # a centre is in its own cluster
            for i in range(16):  # each token sits in the cluster of its nearest centre
                assert dn[i, cs[a[i]]] <= min(dn[i, c] for c in cs) + 1e-9
            for c in range(5):
                m = a == c
                ref = (s_ref[m, None] * xn[m]).sum(0) / s_ref[m].sum()
                np.testing.assert_allclose(merged[b, g, c].numpy(), ref, rtol=1e-9, atol=1e-12)


def test_first_step_has_no_temporal_saliency():
    torch.manual_seed(5)
    y, prev = torch.randn(1, 64, 8), torch.randn(1, 64, 8)
    yw = to_windows(y, GRID, 4)
    first = _merge(y, clusters=4, step=0, prev=prev)
    spatial_only = local_ctm(yw, torch.zeros(1, 4, 16), clusters=4, k=5, lam=1.0)
    assert torch.equal(first[1], spatial_only[1])
    later = _merge(y, clusters=4, step=3, prev=prev, lam=100.0)
    assert not torch.equal(later[1], first[1])  # the saliency now weighs in


def _merge_cost(n_side, window):
    grid = (n_side, n_side, window, window)
    groups = (n_side // window) ** 2
    y = torch.randn(1, n_side * n_side, 32)
    flops = FlopCounterMode(display=False)
    with flops:
        merge_tokens(y, torch.zeros_like(y), torch.tensor(1), grid=grid, groups=groups,
                     clusters=window * window // 2, k=5, lam=1.0)
    gm = torch.fx.experimental.proxy_tensor.make_fx(
        lambda a, p, t: merge_tokens(a, p, t, grid=grid, groups=groups, clusters=window * window // 2, k=5, lam=1.0),
        tracing_mode="fake")(y, torch.zeros_like(y), torch.tensor(1))
    elems = sum(v.numel() for n in gm.graph.nodes if isinstance(v := n.meta.get("val"), torch.Tensor))
    return flops.get_total_flops(), elems


def test_merge_cost_grows_linearly_with_windows():
    f1, e1 = _merge_cost(8, 4)
    f2, e2 = _merge_cost(16, 4)  # 4x the tokens, same window
    assert f2 == 4 * f1 and 3.5 <= e2 / e1 <= 4.0
    g1, _ = _merge_cost(8, 8)
    g2, _ = _merge_cost(16, 16)  # one window over the whole grid: quadratic
    assert g2 / g1 > 10


def test_config_validation():
    for field, bad in [("merge_ratio", 0.0), ("merge_ratio", 1.5), ("token_merge_k", 0), ("num_stages", 0),
                       ("token_merge_lambda", -1.0), ("token_merge_window", 0)]:
        with pytest.raises(ValueError, match=f"FastCacheConfig.{field}"):
            FastCacheConfig(**{field: bad})


@pytest.fixture(scope="module")
def dit_graph():
    model, kw = zoo.build("dit", "tiny", num_layers=3)
    got = {}

    def capture(gm, example_inputs, **_):
        got["gm"], got["ex"] = gm, example_inputs
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, dynamic=False)(**kw)
    torch._dynamo.reset()
    return got["gm"], got["ex"]


def _run(gm, ex, result):
    return gm(*ex, *result.contract.bind(result.contract.initial_state("cpu")))


def test_pass_merge_ratio_one_is_identity_and_shapes_follow(dit_graph):
    gm, ex = dit_graph
    ref = gm(*ex)[0]
    gm1, res = apply_token_merge(gm, FastCacheConfig(enable_token_merge=True, merge_ratio=1.0, num_stages=3))
    assert res.applied and res.tokens_per_stage == [16, 16, 16]
    torch.testing.assert_close(_run(gm1, ex, res)[0], ref, rtol=1e-5, atol=1e-5)
    gm5, res5 = apply_token_merge(gm, FastCacheConfig(enable_token_merge=True, merge_ratio=0.5, num_stages=3))
    assert res5.tokens_per_stage == [16, 8, 4] and res5.grid == (4, 4)
    # the block finder sees the merged stream shapes (meta["val"] refreshed)
    assert [tuple(node_value(r.stream_inputs[0]).shape) for r in find_blocks(gm5).regions] == [(2, 16, 16), (2, 8, 16), (2, 4, 16)]
    out = _run(gm5, ex, res5)
    assert out[0].shape == ref.shape and torch.isfinite(out[0]).all()
    assert not torch.allclose(out[0], ref, atol=1e-4)  # tokens were merged


def test_pass_leaves_blocks_alone_that_bake_the_token_count():
    # Sana's Mix-FFN unflattens the tokens into the h x w grid: merged tokens do not fit
    model, kw = zoo.build("sana", "tiny")
    got = {}
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex, **_: got.setdefault("gm", gm).forward, dynamic=False)(**kw)
    torch._dynamo.reset()
    gm, res = apply_token_merge(got["gm"], FastCacheConfig(enable_token_merge=True, merge_ratio=0.5, num_stages=2))
    assert not res.applied and "token-count generic" in res.reason and gm is got["gm"]


class _Counting(fastcache_fx.FastCacheBackend):
    calls = 0

    def __call__(self, gm, example_inputs, **kwargs):
        type(self).calls += 1
        return super().__call__(gm, example_inputs, **kwargs)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_compiled_dit_with_token_merge(ratio):
    model, kw = zoo.build("dit", "tiny")  # 2 blocks -> 2 stages
    torch._dynamo.reset()
    _Counting.calls = 0
    opts = dict(enable_token_merge=True, merge_ratio=ratio, num_stages=2, warmup_steps=50)
    compiled = torch.compile(model, backend=_Counting(**opts), dynamic=False)
    outs, refs = [], []
    for t in (900, 700, 500, 300):
        x = torch.randn_like(kw["hidden_states"])
        args = dict(kw, hidden_states=x, timestep=torch.full((2,), t))
        outs.append(compiled(**args).sample)
        refs.append(model(**args).sample)
    assert _Counting.calls == 1  # static shapes: one graph for the whole trajectory
    st = fastcache_fx.stats(model)
    assert st["token_merge"]["tokens_per_stage"] == ([16, 16] if ratio == 1.0 else [16, 8])
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and torch.isfinite(o).all()
        if ratio == 1.0:
            torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    if ratio < 1.0:
        assert max((o - r).abs().max() for o, r in zip(outs, refs)) > 1e-3
