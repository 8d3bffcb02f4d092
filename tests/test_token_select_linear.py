"""Token selection's linear static approximations (static_approx "linear" / "cached_linear"):
the block-stack map fitter (calibration/ calibrate_stack) against an offline least-
squares fit on a tiny DiT, the in-graph approximation of the static tokens (pass-level, and in a
compiled trajectory with a fitted calibration), and the fallback to "cached" without a stack map."""

import pytest
import torch
import torch.nn.functional as F

import fastcache_fx
from fastcache_fx import FastCacheConfig, zoo
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.ops.token_select import complement_tokens
from fastcache_fx.passes.token_select import apply_token_select
from fastcache_fx import calibration as C
from fastcache_fx.runtime import registry
from fastcache_fx.runtime.token_select import _stack_map
from conftest import dynamo_graph

TIMESTEPS = [900, 700, 500, 300]


def _latents(kw, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(kw["hidden_states"].shape, generator=g) for _ in TIMESTEPS]


def _run_fn(kw, seeds=(0, 1)):
    def run(model):
        for seed in seeds:  # one trajectory per seed (the timestep goes back up between them)
            for t, x in zip(TIMESTEPS, _latents(kw, seed)):
                model(**dict(kw, hidden_states=x, timestep=torch.full((2,), t, dtype=torch.long)))
    return run


def _stack_pairs(model, kw, seed):
    """(X, Y) [B, N, D] of each step, computed by hand: DiT's patch embedding, then the blocks."""
    out = []
    with torch.no_grad():
        for t, x in zip(TIMESTEPS, _latents(kw, seed)):
            h = model.pos_embed(x)
            tt = torch.full((2,), t, dtype=torch.long)
            y = h
            for blk in model.transformer_blocks:
                y = blk(y, timestep=tt, class_labels=kw["class_labels"])
            out.append((h, y))
    return out


def _lstsq(x, y):
    """Offline affine least squares y ~ x W^T + b on token rows: (W [D, D], b [D])."""
    x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(a, y).solution
    return sol[:-1].T.float(), sol[-1].float()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return zoo.build("dit", "tiny")


@pytest.mark.parametrize("kind", ["stack_linear", "stack_cached_linear"])
def test_stack_fit_matches_offline_least_squares(dit, kind, tmp_path):
    model, kw = dit
    cal = C.calibrate_stack(model, _run_fn(kw), out=tmp_path / "s.safetensors", kind=kind, ridge=0.0)
    pairs = [p for seed in (0, 1) for p in [_stack_pairs(model, kw, seed)]]
    if kind == "stack_linear":
        xs = torch.cat([x for traj in pairs for x, _ in traj])
        ys = torch.cat([y for traj in pairs for _, y in traj])
    else:  # consecutive steps within each trajectory only
        xs = torch.cat([b[0] - a[0] for traj in pairs for a, b in zip(traj, traj[1:])])
        ys = torch.cat([b[1] - a[1] for traj in pairs for a, b in zip(traj, traj[1:])])
    w_ref, b_ref = _lstsq(xs, ys)
    w, b = C.load_stack_map(tmp_path / "s.safetensors", C.STACK_KINDS[kind], 16)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=2e-3)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=2e-3)
    meta = cal.metadata
    assert meta["kind"] == kind and meta["stack"]["static_approx"] == C.STACK_KINDS[kind]
    assert meta["stack"]["first"] == "transformer_blocks.0" and meta["stack"]["last"] == "transformer_blocks.1"
    assert meta["stack"]["samples"] == xs.shape[0] * xs.shape[1] and meta["stack"]["width"] == 16


def test_stack_fit_with_few_samples_degrades_to_the_prior(dit):
    # one step, 2 x 16 token pairs of width 16: GCV refuses a map it cannot support (W -> I)
    model, kw = dit
    cal = C.calibrate_stack(model, lambda m: m(**kw), kind="stack_linear")
    w = cal.tensors[C.STACK_WEIGHT]
    assert (w - torch.eye(16)).abs().max() < 0.05 * (w.abs().max())


def test_stack_map_file_rules(dit, tmp_path):
    model, kw = dit
    C.calibrate_stack(model, _run_fn(kw, (0,)), out=tmp_path / "lin.safetensors", kind="stack_linear")
    with pytest.raises(ValueError, match="static_approx='linear'"):
        C.load_stack_map(tmp_path / "lin.safetensors", "cached_linear", 16)
    with pytest.raises(ValueError, match="width 16"):
        C.load_stack_map(tmp_path / "lin.safetensors", "linear", 32)
    with pytest.raises(ValueError, match="stack_cached_linear needs two model calls"):
        C.calibrate_stack(model, lambda m: m(**kw), kind="stack_cached_linear")
    # fastcache_fx.calibrate (and the CLI) dispatch the stack kinds; no rank / time buckets
    with pytest.raises(ValueError, match="no rank"):
        fastcache_fx.calibrate(model, _run_fn(kw, (0,)), kind="stack_linear", rank=2)
    cal = fastcache_fx.calibrate(model, _run_fn(kw, (0,)), kind="stack_cached_linear")
    assert cal.metadata["stack"]["static_approx"] == "cached_linear" and set(cal.tensors) == {C.STACK_WEIGHT, C.STACK_BIAS}
    # block maps + the stack map in one file: both loaders find theirs
    blocks = C.calibrate(model, _run_fn(kw, (0,)), kind="linear")
    C.save(C.merge_stack(blocks, C.load(tmp_path / "lin.safetensors")), tmp_path / "both.safetensors")
    assert C.load_stack_map(tmp_path / "both.safetensors", "linear", 16) is not None
    C.save(blocks, tmp_path / "blocks.safetensors")
    assert C.load_stack_map(tmp_path / "blocks.safetensors", "linear", 16) is None


@pytest.fixture(scope="module")
def dit_graph(dit):
    model, kw = dit
    return dynamo_graph(model, kw)


def test_missing_stack_map_warns_and_falls_back_to_cached(dit, dit_graph, tmp_path):
    model, kw = dit
    regions = find_blocks(dit_graph[0]).regions
    C.save(C.calibrate(model, _run_fn(kw, (0,)), kind="linear"), tmp_path / "blocks.safetensors")
    for cal, why in ((None, "no calibration"), (str(tmp_path / "blocks.safetensors"), "no stack map")):
        with pytest.warns(UserWarning, match=why):
            cfg = FastCacheConfig(enable_spatial_approx=True, static_approx="linear", calibration=cal)
            assert _stack_map(cfg, regions, "cpu") == ("cached", None)
    with pytest.raises(ValueError, match="calibration.*approx"):  # online fits block maps, never a stack map
        FastCacheConfig(enable_spatial_approx=True, static_approx="linear", calibration="online")
    C.calibrate_stack(model, _run_fn(kw, (0,)), out=tmp_path / "s.safetensors", kind="stack_cached_linear")
    cfg = FastCacheConfig(enable_spatial_approx=True, static_approx="cached_linear",
                          calibration=str(tmp_path / "s.safetensors"))
    got, (w, b) = _stack_map(cfg, regions, "cpu")
    assert got == "cached_linear" and w.shape == (16, 16) and b.shape == (16,)


@pytest.mark.parametrize("mode", ["linear", "cached_linear"])
@pytest.mark.parametrize("reference", ["previous", "anchor"])
def test_static_tokens_get_the_stack_map_in_the_graph(dit, dit_graph, mode, reference):
    model, kw = dit
    gm, inputs = dit_graph
    k = 4
    gm4, res = apply_token_select(gm, FastCacheConfig(reference=reference, enable_spatial_approx=True), k, static_approx=mode)
    assert res.applied, res.reason
    assert [w.shape for w in res.weights] == [(16, 16), (16,)]
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(16, 16, generator=g) / 4, torch.randn(16, generator=g)
    state = [torch.full(s.shape, s.fill, dtype=s.dtype) for s in res.state]
    state[0] = torch.randn(state[0].shape, generator=g)  # x_ref
    state[1] = torch.randn(state[1].shape, generator=g)  # y_ref
    state[2], state[3] = torch.tensor(0), torch.tensor(1e4)  # this call is step 1 of a trajectory
    outs = torch.fx.Interpreter(gm4).run(*inputs, *state, w, b)
    idx, x_new, y_new = outs[-1], outs[-7], outs[-6]
    static = complement_tokens(idx, 16)
    assert static.shape == (12,) and sorted(static.tolist() + idx.tolist()) == list(range(16))
    x = model.pos_embed(kw["hidden_states"])  # the stack input, by hand
    x_ref, y_ref = state[0], state[1]
    if mode == "linear":
        want = F.linear(x[:, static], w, b)
    else:
        want = y_ref[:, static] + F.linear(x[:, static] - x_ref[:, static], w, b)
    h = x[:, idx]
    for blk in model.transformer_blocks:
        h = blk(h, timestep=kw["timestep"], class_labels=kw["class_labels"])
    if reference == "previous":  # Y_ref' = the stack output used: approximated static tokens
        torch.testing.assert_close(x_new, x)
        torch.testing.assert_close(y_new[:, static], want, rtol=1e-5, atol=1e-5)
    else:  # anchor: X_ref and Y_ref keep the computed values of static tokens
        torch.testing.assert_close(x_new[:, static], x_ref[:, static])
        torch.testing.assert_close(y_new[:, static], y_ref[:, static])
    torch.testing.assert_close(y_new[:, idx], h, rtol=1e-5, atol=1e-5)
    # the static tokens' approximation reaches the model output: the cached one gives another
    cached, _ = apply_token_select(gm, FastCacheConfig(reference=reference, enable_spatial_approx=True), k)
    outs_c = torch.fx.Interpreter(cached).run(*inputs, *state[:6])
    assert torch.equal(outs_c[-1], idx) and not torch.allclose(outs_c[0], outs[0])


def _trajectory(model, kw, moves, snaps):
    """Step i adds 1 to the latent patches in moves[i] (token p of the 4 x 4 grid); after each
    step, snaps gets (k, idx or None, x_ref, y_ref) of the token-selection state."""
    x = kw["hidden_states"].clone()
    for t, mv in zip([900, 800, 700, 600, 500], moves):
        x = x.clone()
        for p in mv:
            r, c = divmod(p, 4)
            x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += 1.0
        model(**dict(kw, hidden_states=x, timestep=torch.full((2,), t, dtype=torch.long)))
        rt = registry.lookup(model).graphs[-1]
        st = rt.state_of("default")
        k = rt.select_trace[-1].k
        snaps.append((k, st["idx"][k].clone() if k < 16 else None, st["shared"][0].clone(), st["shared"][1].clone()))


def test_compiled_trajectory_uses_the_calibrated_stack_map(tmp_path):
    model, kw = zoo.build("dit", "tiny")
    path = tmp_path / "stack.safetensors"
    C.calibrate_stack(model, _run_fn(kw), out=path, kind="stack_linear")
    w, b = C.load_stack_map(path, "linear", 16)
    torch._dynamo.reset()
    sel = fastcache_fx.enable_fastcache(model, warmup_steps=2, enable_spatial_approx=True, motion_threshold=0.01,
                                        enable_block_approx=False, static_approx="linear", calibration=str(path),
                                        reference="previous")
    snaps = []
    _trajectory(sel, kw, [[], [0, 1, 2], [4, 5, 6], [8], [3]], snaps)
    st = fastcache_fx.stats(sel)
    assert st["token_select"]["static_approx"] == "linear"
    assert [s[0] for s in snaps] == [16, 16, 4, 4, 4]
    for k, idx, x_ref, y_ref in snaps[2:]:  # reference="previous": x_ref = X_t, y_ref = the stack output
        static = complement_tokens(idx, 16)
        torch.testing.assert_close(y_ref[:, static], F.linear(x_ref[:, static], w, b), rtol=1e-4, atol=1e-4)
