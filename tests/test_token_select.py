"""Motion-aware token selection (passes/token_select.py, runtime/token_select.py): saliency and
selection, gather/scatter bookkeeping, the Flux rotary embedding on a token subset, and
compiled trajectories on a tiny DiT (motion_threshold=0 equals the block-only path, unchanged
tokens are static, at most one compiled variant per bucket, new trajectories run every token)."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import FastCacheConfig, zoo
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.ops.token_select import gather_tokens, scatter_tokens, select_tokens, token_saliency
from fastcache_fx.passes.token_select import apply_token_select, bucket_sizes
from fastcache_fx.runtime import registry
from conftest import dynamo_graph


# ----------------------------------------------------------------------------------------------
# tensor functions
# ----------------------------------------------------------------------------------------------

def test_gather_scatter_keeps_every_token_in_place():
    torch.manual_seed(1)
    x = torch.randn(2, 12, 5)
    base = torch.randn(2, 12, 5)
    idx = torch.tensor([0, 3, 4, 9, 11])
    g = gather_tokens(x, idx)
    assert g.shape == (2, 5, 5) and torch.equal(g, x[:, idx])
    out = scatter_tokens(base, idx, g)
    static = torch.tensor([i not in idx.tolist() for i in range(12)])
    assert torch.equal(out[:, idx], x[:, idx]) and torch.equal(out[:, static], base[:, static])
    # a permutation of all tokens: gathering then scattering is the identity
    perm = torch.randperm(12)
    assert torch.equal(scatter_tokens(base, perm, gather_tokens(x, perm)), x)
    # each token's value lands on its own position even with tokens made distinguishable by index
    tagged = torch.arange(12.0).view(1, 12, 1).expand(2, 12, 5)
    back = scatter_tokens(torch.full_like(tagged, -1.0), idx, gather_tokens(tagged, idx))
    assert back[0, :, 0].tolist() == [float(i) if i in idx.tolist() else -1.0 for i in range(12)]


def test_joint_sequence_gather_keeps_text_tokens_first():
    rot = torch.arange(22.0).view(22, 1).expand(22, 4)  # 6 text + 16 image positions
    idx = torch.tensor([1, 7, 15])
    g = gather_tokens(rot, idx, dim=0, offset=6)
    assert g[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 7, 13, 21]


def test_unchanged_tokens_are_static():
    torch.manual_seed(2)
    ref = torch.randn(2, 16, 8)
    x = ref.clone()
    moved = [2, 5, 11]
    x[0, 2] += 1.0
    x[1, 5] += 0.5  # a token moving in one sample only is a motion token for the batch
    x[:, 11] += 2.0
    s = token_saliency(x, ref)
    assert torch.equal(s == 0, torch.tensor([i not in moved for i in range(16)]))
    idx, m = select_tokens(x, ref, torch.tensor(3), k=4, threshold=0.0)
    assert int(m) == 3 and set(moved) <= set(idx.tolist()) and idx.tolist() == sorted(idx.tolist())
    idx, m = select_tokens(x, ref, torch.tensor(3), k=3, threshold=0.0)
    assert idx.tolist() == moved
    # the threshold is relative to the mean squared token norm: a tiny move is below it
    x2 = ref.clone()
    x2[:, 4] += 1e-3
    assert int(select_tokens(x2, ref, torch.tensor(3), k=3, threshold=1e-4)[1]) == 0
    # the first step of a trajectory has no reference: every token moves
    assert int(select_tokens(x, ref, torch.tensor(0), k=3, threshold=0.0)[1]) == 16


def test_bucket_sizes_and_config():
    assert bucket_sizes(16, (0.25, 0.5, 0.75, 1.0)) == [4, 8, 12, 16]
    assert bucket_sizes(10, (0.25,)) == [3, 10]
    assert FastCacheConfig(enable_spatial_approx=True, token_buckets=[0.5, 0.25]).token_buckets == (0.25, 0.5)
    for field, value in (("token_buckets", (0.0,)), ("token_buckets", ()), ("token_buckets", (1.5,)),
                         ("static_approx", "linear_cached")):
        with pytest.raises(ValueError, match=f"FastCacheConfig.{field}"):
            FastCacheConfig(**{field: value})


# ----------------------------------------------------------------------------------------------
# the pass on a Flux graph (run eagerly, no Inductor)
# ----------------------------------------------------------------------------------------------

def test_flux_variant_matches_eager_on_the_same_token_subset():
    model, kw = zoo.build("flux", "tiny")
    gm, inputs = dynamo_graph(model, kw)
    cfg = FastCacheConfig(enable_spatial_approx=True, motion_threshold=0.0)
    gm8, res = apply_token_select(gm, cfg, 8)
    assert res.applied, res.reason
    assert res.tokens == 16 and res.text_tokens == 6 and len(res.contexts) == 2  # rotary cos, sin
    seen = {}

    class Spy(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and getattr(n.target, "__name__", "") == "gather_tokens" and n.kwargs.get("offset"):
                seen.setdefault("rot", []).append(out)
            return out

    state = [torch.full(s.shape, s.fill, dtype=s.dtype) for s in res.state]
    state[2] = torch.tensor(0)  # step 0 of a trajectory that had timestep 1.0: this call is step 1
    state[3] = torch.tensor(1.0)
    outs = Spy(gm8).run(*inputs, *state)
    idx = outs[-1]
    assert idx.shape == (8,) and int(outs[-2]) == 16  # x_ref zeros: every token moved
    # eager model on the same subset: image tokens idx (and their ids), all text tokens
    sub = dict(kw, hidden_states=kw["hidden_states"][:, idx], img_ids=kw["img_ids"][idx])
    eager = model(**sub).sample
    torch.testing.assert_close(outs[0][:, idx], eager, rtol=1e-5, atol=1e-5)
    ids = torch.cat([kw["txt_ids"], kw["img_ids"][idx]])
    cos, sin = model.pos_embed(ids)
    assert len(seen["rot"]) == 2
    torch.testing.assert_close(seen["rot"][0], cos)
    torch.testing.assert_close(seen["rot"][1], sin)


def test_sd3_variant_matches_its_blocks_on_the_same_token_subset():
    # SD3 joins [image, text] and splits by slicing at N: the slices are rewritten to k
    model, kw = zoo.build("sd3", "tiny")
    gm, inputs = dynamo_graph(model, kw)
    g8, res = apply_token_select(gm, FastCacheConfig(enable_spatial_approx=True), 8)
    assert res.applied, res.reason
    assert res.text_tokens == 6 and res.contexts == []
    state = [torch.full(s.shape, s.fill, dtype=s.dtype) for s in res.state]
    state[2], state[3] = torch.tensor(0), torch.tensor(1000.0)
    outs = g8(*inputs, *state)
    idx, y_ref = outs[-1], outs[2]
    h = model.pos_embed(kw["hidden_states"])[:, idx]
    temb = model.time_text_embed(kw["timestep"], kw["pooled_projections"])
    enc = model.context_embedder(kw["encoder_hidden_states"])
    for blk in model.transformer_blocks:
        enc, h = blk(hidden_states=h, encoder_hidden_states=enc, temb=temb)
    torch.testing.assert_close(y_ref[:, idx], h, rtol=1e-5, atol=1e-5)


def test_changed_token_set_forces_full_blocks():
    # a block-cache anchor holds the tokens of the step it was computed at: reused for another
    # token set it would be stale, so a changed set overrides "force approximation" with "full"
    from fastcache_fx.passes.block_cache import apply_block_cache
    from fastcache_fx.passes.token_select import attach_token_select

    model, kw = zoo.build("dit", "tiny")
    gm, inputs = dynamo_graph(model, kw)
    cfg = FastCacheConfig(enable_spatial_approx=True, motion_threshold=0.0, warmup_steps=0)
    gm4, res = apply_token_select(gm, cfg, 4)
    gm4, layout = apply_block_cache(gm4, cfg, find_blocks(gm4).regions)
    gm4 = attach_token_select(gm4)
    torch.manual_seed(3)
    mine = [torch.randn(s.shape) if s.name.endswith("_ref") else torch.full(s.shape, s.fill, dtype=s.dtype)
            for s in res.state]
    mine[2], mine[3] = torch.tensor(0), torch.tensor(1000.0)  # this call is step 1

    def run(force: int, idx_prev):
        torch.manual_seed(4)  # the same finite anchors in every run, so a forced approximation is taken
        extra = []
        for spec in layout.extra_inputs:
            if spec.role == "control":
                extra.append(torch.full(spec.shape, force, dtype=spec.dtype))
            elif spec.name == "step":
                extra.append(torch.tensor(0))
            elif spec.name == "prev_t":
                extra.append(torch.tensor(1000.0))
            elif spec.dtype.is_floating_point:
                extra.append(torch.randn(spec.shape, dtype=spec.dtype))
            else:
                extra.append(torch.zeros(spec.shape, dtype=spec.dtype))
        outs = gm4(*inputs, *mine[:5], idx_prev, *extra)
        nu = layout.num_user_outputs
        return outs[0], outs[nu - 1], outs[nu + len(layout.state) + 2]  # output, idx, approx [L]

    full, idx, ok = run(0, torch.full((4,), -1))
    assert not ok.any()
    forced_changed, _, ok = run(1, torch.full((4,), -1))
    assert not ok.any() and torch.equal(forced_changed, full)
    forced_same, _, ok = run(1, idx)
    assert ok.all() and not torch.allclose(forced_same, full)


def test_pass_leaves_a_graph_without_blocks_alone():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    out, res = apply_token_select(gm, FastCacheConfig(), 2, regions=find_blocks(gm).regions)
    assert not res.applied and out is gm


# ----------------------------------------------------------------------------------------------
# compiled trajectories (tiny DiT: 16 image tokens, buckets 4 / 8 / 12 / 16)
# ----------------------------------------------------------------------------------------------

TIMESTEPS = [900, 800, 700, 600, 500, 400]


def _trajectory(model, kw, moves, timesteps=TIMESTEPS, scale=1.0):
    """Run a trajectory; step i adds ``scale`` to the latent patches (2 x 2 pixels) listed in
    moves[i] (DiT's patch p of the 4 x 4 grid is token p)."""
    x = kw["hidden_states"].clone()
    outs = []
    for t, mv in zip(timesteps, moves):
        x = x.clone()
        for p in mv:  # token p of the 4 x 4 grid covers pixels (2r..2r+1, 2c..2c+1)
            r, c = divmod(p, 4)
            x[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2] += scale
        outs.append(model(**dict(kw, hidden_states=x, timestep=torch.full((2,), t, dtype=torch.long))).sample)
    return outs


@pytest.fixture(scope="module")
def zero_threshold_runs():
    # a denoising-like trajectory: every token moves a little at every step
    moves = [list(range(16))] * len(TIMESTEPS)
    model, kw = zoo.build("dit", "tiny")
    torch._dynamo.reset()
    plain = fastcache_fx.enable_fastcache(model, warmup_steps=1)
    ref = _trajectory(plain, kw, moves, scale=0.1)
    model, kw = zoo.build("dit", "tiny")
    torch._dynamo.reset()
    sel = fastcache_fx.enable_fastcache(model, warmup_steps=1, enable_spatial_approx=True, motion_threshold=0.0)
    got = _trajectory(sel, kw, moves, scale=0.1)
    return ref, got, fastcache_fx.stats(sel), fastcache_fx.stats(plain)


def test_zero_threshold_equals_block_only_path(zero_threshold_runs):
    ref, got, st, st_plain = zero_threshold_runs
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    steps = st["token_select"]["steps"]
    assert [r["k"] for r in steps] == [16] * len(TIMESTEPS) and [r["m"] for r in steps] == [16] * len(TIMESTEPS)
    assert st["spatial_approx_ratio"] == 0.0 and st["token_select"]["variants_compiled"] == 1
    # the block cache inside the variant decides as it does without token selection
    assert [r["approx"] for r in st["trace"]] == [r["approx"] for r in st_plain["trace"]]


@pytest.fixture(scope="module")
def selected_run():
    model, kw = zoo.build("dit", "tiny")
    torch._dynamo.reset()
    sel = fastcache_fx.enable_fastcache(model, warmup_steps=2, enable_spatial_approx=True, motion_threshold=0.01,
                                        enable_block_approx=False)
    moves = [[], [0, 1, 2], [4, 5, 6], [8], [1, 3, 7, 9, 11, 13], [2]]
    _trajectory(sel, kw, moves)
    rt = registry.lookup(model).graphs[-1]
    st1 = fastcache_fx.stats(sel)
    snap = rt.state_of("default")
    snap = {"idx": snap["idx"][8].clone(), "x_ref": snap["shared"][0].clone(), "y_ref": snap["shared"][1].clone()}
    # a new trajectory (timestep back up) while the small variant is picked: every token runs
    _trajectory(sel, kw, [[0]], timesteps=[900])
    return sel, rt, snap, st1, fastcache_fx.stats(sel), kw, model


def test_unchanged_tokens_are_approximated_and_buckets_follow_motion(selected_run):
    _, rt, _, st, _, _, _ = selected_run
    steps = st["token_select"]["steps"]
    assert [r["m"] for r in steps] == [16, 3, 3, 1, 6, 3]
    # warm-up (2 steps) runs every token; then the smallest bucket >= the previous step's m.
    # Step 4 computes 4 of its 6 moved tokens; the other 2 keep their anchor and count at step 5
    assert [r["k"] for r in steps] == [16, 16, 4, 4, 4, 8]
    assert st["spatial_approx_ratio"] == pytest.approx((12 * 3 + 8) / (16 * 6))
    assert st["token_select"]["variants_compiled"] <= len(st["token_select"]["buckets"])
    assert sorted(rt.variants) == [4, 8, 16]


def test_motion_tokens_match_the_blocks_on_that_subset(selected_run):
    _, _, snap, _, _, kw, model = selected_run
    # the last step of the trajectory (k=8): the state holds the stack output of the 8 computed tokens
    idx, x_ref, y_ref = snap["idx"], snap["x_ref"], snap["y_ref"]
    assert 2 in idx.tolist()  # the token that moved
    h = x_ref[:, idx]  # anchor reference: the computed tokens' inputs of this step
    t = torch.full((2,), TIMESTEPS[-1], dtype=torch.long)
    for blk in model.transformer_blocks:
        h = blk(h, timestep=t, class_labels=kw["class_labels"])
    torch.testing.assert_close(y_ref[:, idx], h, rtol=1e-5, atol=1e-5)


def test_new_trajectory_runs_every_token(selected_run):
    _, rt, _, st1, st2, _, _ = selected_run
    last = st2["token_select"]["steps"][-1]
    assert last["step"] == 0 and last["k"] == 16
    assert st2["token_select"]["variants_compiled"] == st1["token_select"]["variants_compiled"]
    assert st2["steps"] == st1["steps"] + 1  # the discarded small-variant call leaves no block trace


@pytest.mark.parametrize("rising", [False, True])
def test_token_selection_clock_follows_the_trajectory_direction(rising):
    """A pipeline passing 1 - sigma (Lumina 2, Z-Image) raises the timestep every step: the
    variant's own clock continues the trajectory as it does for a falling one (state t_first),
    and a repeated timestep starts a new one."""
    from fastcache_fx.passes.blocks import find_timestep

    model, kw = zoo.build("dit", "tiny")
    gm, inputs = dynamo_graph(model, kw)
    g4, res = apply_token_select(gm, FastCacheConfig(enable_spatial_approx=True), 4)
    assert res.applied, res.reason
    names = [s.name for s in res.state]
    assert names[:5] == ["token_select.x_ref", "token_select.y_ref", "token_select.step", "token_select.prev_t",
                         "token_select.t_first"]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    at = placeholders.index(find_timestep(placeholders))
    state = [torch.full(s.shape, s.fill, dtype=s.dtype) for s in res.state]
    nu = res.num_user_outputs
    steps = []
    for t in ([100.0, 200.0, 300.0, 300.0] if rising else [300.0, 200.0, 100.0, 100.0]):
        args = list(inputs)
        args[at] = torch.full_like(inputs[at], t)
        outs = g4(*args, *state)
        new = list(outs[nu:])
        steps.append(int(new[2]))
        state = new[:5] + [new[-1]]  # x_ref, y_ref, step, prev_t, t_first; the indices
    assert steps == [0, 1, 2, 0]
