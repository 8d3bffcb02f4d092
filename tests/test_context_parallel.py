"""The block cache under diffusers context parallelism: 2 gloo processes on this CPU, every
rank takes the branch one process takes on the whole sequence (issue: many devices)."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import assert_parallel_equals_one_process, dynamo_graph, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))


TIMEOUT_S = 900  # seconds: the repro takes minutes on a loaded 2-core machine; a hang fails here


def _run_worker(family: str, tmp_path, *extra: str) -> dict:
    out = tmp_path / f"{family}.pt"
    # own session, so that on a timeout the spawned ranks are killed with their parent
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "cp_worker.py"), family, str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # a hang (ranks disagreeing on a branch, so one waits in a collective) fails here
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"context-parallel workers ({family}) did not finish within {TIMEOUT_S} s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=False)


def _assert_repro_equal(res: dict) -> None:
    """Every rank equals one process on every step (relative error < 1e-4), with the same
    decisions, the same share of block computations approximated, and the same step counter."""
    single = res["single"]
    assert 0 < single["ratio"] < 1  # the trajectory approximates, and not everything
    for rank in res["ranks"]:
        errs = [rel_err(a, b) for a, b in zip(rank["outs"], single["outs"])]
        assert max(errs) < 1e-4, errs
        assert [(s, a) for s, a, _ in rank["trace"]] == [(s, a) for s, a, _ in single["trace"]]
        assert rank["ratio"] == pytest.approx(single["ratio"], abs=1e-12)
        # the decision sums are those of the whole sequence: the same delta as one process
        for (_, _, d), (_, _, d1) in zip(rank["trace"], single["trace"]):
            assert d == pytest.approx(d1, rel=1e-4, abs=1e-6)  # ~1e-9 on an unchanged input: rounding
    # diffusers' context-parallel hook caches the forward's signature on the first call, so a bare
    # torch.compile recompiles at the second step: that identical graph must continue the trajectory
    assert res["ranks"][0]["graphs"] == 2 and single["graphs"] == 1


REPRO = {  # issue 36's options: cache_ratio_threshold selects the chi-square rule; {} the default rule
    "chi2": {"cache_ratio_threshold": 0.3},
    "output": {},
    "step": {"cache_ratio_threshold": 0.3, "cache_level": "step"},
}


def test_ulysses_repro_equals_one_process(tmp_path):
    """Issue 36: tiny Flux (1 double + 2 single blocks, 16 image + 6 text tokens) under Ulysses 2,
    a bare ``torch.compile`` with no warm-up run before it, 7 steps, the input constant for 4
    steps and then only rank 1's shard changing: the chi-square rule at the block level."""
    _assert_repro_equal(_run_worker("repro", tmp_path, json.dumps(REPRO["chi2"])))


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["output", "step"])
def test_ulysses_repro_equals_one_process_other_rules(rule, tmp_path):
    """The same trajectory with the default options (``decision="output"``: the gain, the run's
    spent budget and the error sums cross ranks too) and at the step level."""
    _assert_repro_equal(_run_worker("repro", tmp_path, json.dumps(REPRO[rule])))


@pytest.mark.slow
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


@pytest.mark.slow
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
    # all-reduce (here: rank 1's sums added to rank 0's) of the weighted sums (k / M: 1 for the
    # image, 1/2 for the text) gives one process's sums, each element counted once, and its delta
    from fastcache_fx.ops import decision as D
    from fastcache_fx.passes.shards import sum_weights

    h, a, t, u = torch.randn(1, 8, 8), torch.randn(1, 8, 8), torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    kw = dict(q_ratio=1.0, tau=1.0, beta=None, timestep_max=1.0, min_step=1, max_consecutive=3, enabled=True)
    state = (torch.tensor(2), torch.tensor(0), torch.tensor(0.5))
    one = block_decision([h, t], [a, u], *state, **kw)[1]
    whole = torch.stack([(h - a).pow(2).sum() + (t - u).pow(2).sum(), a.pow(2).sum() + u.pow(2).sum()])
    assert sum_weights([2, 1], 2, []) is None
    for weights, equal in ((sum_weights([2, 1], 2, ["g"]), True), (None, False)):
        sent = {}
        monkeypatch.setattr(D, "sum_over_groups", lambda x, g: sent.setdefault("x", x))
        block_decision([h[:, 4:], t], [a[:, 4:], u], *state, groups=("g",), stream_weights=weights, **kw)
        monkeypatch.setattr(D, "sum_over_groups", lambda x, g: sent.setdefault("sum", x + sent["x"]))
        two = block_decision([h[:, :4], t], [a[:, :4], u], *state, groups=("g",), stream_weights=weights, **kw)[1]
        assert (float(two) == pytest.approx(float(one), rel=1e-5)) is equal
        assert torch.allclose(sent["sum"].reshape(2), whole, rtol=1e-5) is equal


class _SingleStreamOfTextAndImage(torch.nn.Module):
    """Text every rank holds whole concatenated with a sharded image before the blocks (a
    single-stream block loop, as older diffusers Flux and xDiT wrappers build it)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_JointBlock() for _ in range(2))

    def forward(self, x, txt, temb):
        s = torch.cat([txt, x.chunk(2, dim=1)[0]], dim=1)
        c = txt
        for blk in self.blocks:
            s, c = blk(s, c, temb)
        return s, c


def test_token_segments_of_a_concatenated_stream(monkeypatch):
    """A stream that joins the replicated text (k = 1) and the sharded image (k = 2): ND and the
    weights go per token segment, so the all-reduced sums count the text once, not once per rank."""
    from fastcache_fx.ops import decision as D
    from fastcache_fx.passes.blocks import find_blocks
    from fastcache_fx.passes.shards import sum_weights, token_segments, token_shards

    gm, _ = dynamo_graph(_SingleStreamOfTextAndImage(), dict(x=torch.randn(1, 8, 8), txt=torch.randn(1, 6, 8),
                                                             temb=torch.randn(1, 8)))
    shards = token_shards(gm, ["g"], sizes={"g": 2})
    segments = token_segments(gm, shards)
    regions = find_blocks(gm).regions
    assert [segments.get(r.stream_inputs[0]) for r in regions] == [((6, 1), (4, 2))] * 2
    assert all(r.stream_inputs[1] not in segments for r in regions)
    weights = sum_weights([segments[regions[0].stream_inputs[0]]], 2, ["g"])
    assert weights == ((0.5,) * 6 + (1.0,) * 4,)
    # two ranks: the text (6 tokens) on both, the image's halves (4 + 4); one process: 6 + 8 tokens
    t, i = torch.randn(1, 6, 8), torch.randn(1, 8, 8)
    ta, ia = torch.randn(1, 6, 8), torch.randn(1, 8, 8)
    kw = dict(q_ratio=1.0, tau=1.0, beta=None, timestep_max=1.0, min_step=1, max_consecutive=3, enabled=True)
    state = (torch.tensor(2), torch.tensor(0), torch.tensor(0.5))
    one = D.block_decision([torch.cat([t, i], 1)], [torch.cat([ta, ia], 1)], *state, **kw)[1]
    sent = {}
    monkeypatch.setattr(D, "sum_over_groups", lambda x, g: sent.setdefault("x", x))
    D.block_decision([torch.cat([t, i[:, 4:]], 1)], [torch.cat([ta, ia[:, 4:]], 1)], *state, groups=("g",),
                     stream_weights=weights, **kw)
    monkeypatch.setattr(D, "sum_over_groups", lambda x, g: x + sent["x"])
    two = D.block_decision([torch.cat([t, i[:, :4]], 1)], [torch.cat([ta, ia[:, :4]], 1)], *state, groups=("g",),
                           stream_weights=weights, **kw)[1]
    assert float(two) == pytest.approx(float(one), rel=1e-5)
