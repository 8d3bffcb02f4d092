"""The block cache under diffusers context parallelism: 2 gloo processes on this CPU, every
rank takes the branch one process takes on the whole sequence (issue: many devices)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_parallel_equals_one_process, dynamo_graph

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_worker(family: str, tmp_path) -> dict:
    out = tmp_path / f"{family}.pt"
    # a hang (ranks disagreeing on a branch, so one waits in a collective) fails here
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cp_worker.py"), family, str(out)],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("family", ["flux", "qwenimage", "wan"])
def test_ulysses_decisions_equal_one_process(family, tmp_path):
    """Flux (double + single blocks), an MMDiT with joint blocks (QwenImage: diffusers' SD3
    class has no context-parallel attention, see docs/multi-device.md) and a video DiT (Wan:
    diffusers' _cp_plan splits the tokens at the first block) under Ulysses 2."""
    res = _run_worker(family, tmp_path)
    cp, single = res["cp"], res["single"]
    # every cached graph (Wan: a second one after a recompile) all-reduces over the CP group
    assert cp["fallback"] == [] and cp["groups"] and all(g == ["0"] for g in cp["groups"])  # the decision sums are all-reduced over the CP group
    assert_parallel_equals_one_process(cp, single)
    # the chi-square bound takes ND of the whole sequence, not of the rank's shard (half of it)
    assert sum(cp["on_threshold"], []) == pytest.approx(sum(single["on_threshold"], []), rel=1e-6)
    # step 6: the first block's delta lies between the bound of the whole sequence and the looser
    # bound of one shard; one process computes the block, and so must every rank
    lo, hi = res["near_bound"]
    assert lo < single["on_delta"][6][0] < hi and not single["on_trace"][6][0]
    assert cp["on_delta"][6][0] == pytest.approx(single["on_delta"][6][0], rel=1e-4)


def test_ulysses_step_level_equals_one_process(tmp_path):
    """cache_level="step" on Flux under Ulysses 2: the span's decision sums are all-reduced, so
    every rank takes the branch one process takes, including step 4, where only rank 1's shard
    of the input changes."""
    res = _run_worker("flux-step", tmp_path)
    cp, single = res["cp"], res["single"]
    assert cp["fallback"] == [] and cp["groups"] and all(g == ["0"] for g in cp["groups"])
    assert all(len(r) == 1 for r in cp["on_trace"])  # one decision per step
    assert_parallel_equals_one_process(cp, single)


def test_token_passes_refused_under_context_parallelism():
    from fastcache_fx import zoo
    from fastcache_fx.backend import plan
    from fastcache_fx.config import FastCacheConfig

    model, kw = zoo.build("dit")
    gm, inputs = dynamo_graph(model, kw)
    # a functional collective in the graph is what context parallelism leaves there
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    for opt in ("enable_spatial_approx", "enable_token_merge"):
        with pytest.raises(ValueError, match=f"{opt}.*context parallelism"):
            plan(gm, inputs, FastCacheConfig(**{opt: True}), None)
    assert plan(gm, inputs, FastCacheConfig(), None).regions  # the block cache itself is fine


class _JointBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mod, self.f, self.g = torch.nn.Linear(8, 16), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x, c, temb):
        scale, shift = self.mod(temb).unsqueeze(1).chunk(2, dim=-1)  # a cut of the features: not a shard
        return x + self.f(x) * scale + shift + c.mean(1, keepdim=True), c + self.g(c)


class _ShardedImageReplicatedText(torch.nn.Module):
    """What a sequence-parallel wrapper leaves in the graph when it shards the image tokens
    (``x.chunk(world, dim=1)[rank]``) but not the text (xDiT with a text length not divisible by
    the degree)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_JointBlock() for _ in range(2))

    def forward(self, x, txt, temb):
        x = x.chunk(2, dim=1)[0]
        third = txt.chunk(3, dim=1)[0]  # 3 pieces: no group has 3 ranks
        for blk in self.blocks:
            x, txt = blk(x, txt, temb)
        return x, txt, third


def test_token_shards_and_stream_weights(monkeypatch):
    """ND and the weights of the decision sums follow how each stream is split over the ranks:
    the sharded image counts its shard twice (2 ranks), the replicated text once."""
    from fastcache_fx.passes.blocks import find_blocks
    from fastcache_fx.passes.shards import token_shards
    from fastcache_fx.ops.decision import block_decision

    gm, _ = dynamo_graph(_ShardedImageReplicatedText(), dict(x=torch.randn(1, 8, 8), txt=torch.randn(1, 6, 8),
                                                             temb=torch.randn(1, 8)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    img_out = out.args[0][0]
    with gm.graph.inserting_before(out):
        gathered = gm.graph.call_function(torch.ops._c10d_functional.all_gather_into_tensor.default, (img_out, 2, "g"))
    shards = token_shards(gm, ["g"], sizes={"g": 2})
    regions = find_blocks(gm).regions
    assert [[shards[h] for h in r.stream_inputs] for r in regions] == [[2, 1], [2, 1]]
    assert shards[gathered] == 1 and shards[out.args[0][2]] == 1
    assert all(shards[n] == 1 for n in gm.graph.nodes if n.op == "placeholder")
    # two ranks, each with half of the image (h, anchor a) and all of the text (t, anchor u): the
    # all-reduce (here: rank 1's sums added to rank 0's) of the weighted sums gives one process's delta
    from fastcache_fx.ops import decision as D

    h, a, t, u = torch.randn(1, 8, 8), torch.randn(1, 8, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    kw = dict(q_ratio=1.0, tau=1.0, beta=None, timestep_max=1.0, min_step=1, max_consecutive=3, enabled=True)
    state = (torch.tensor(2), torch.tensor(0), torch.tensor(0.5))
    one = block_decision([h, t], [a, u], *state, **kw)[1]
    for weights, equal in (((2, 1), True), (None, False)):
        sent = {}
        monkeypatch.setattr(D, "sum_over_groups", lambda x, g: sent.setdefault("x", x))
        block_decision([h[:, 4:], t], [a[:, 4:], u], *state, groups=("g",), stream_weights=weights, **kw)
        monkeypatch.setattr(D, "sum_over_groups", lambda x, g: x + sent["x"])
        two = block_decision([h[:, :4], t], [a[:, :4], u], *state, groups=("g",), stream_weights=weights, **kw)[1]
        assert (float(two) == pytest.approx(float(one), rel=1e-5)) is equal
