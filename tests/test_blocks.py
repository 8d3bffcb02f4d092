import operator

import pytest
import torch
from torch import fx

from fastcache_fx import zoo
from fastcache_fx.passes.block_cache import apply_block_cache
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.config import FastCacheConfig


def capture(model, kwargs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    assert len(graphs) == 1
    return graphs[0]


EXPECTED = {  # family: [(block name, number of streams)]
    "dit": [("transformer_blocks.0", 1), ("transformer_blocks.1", 1)],
    "pixart": [("transformer_blocks.0", 1), ("transformer_blocks.1", 1)],
    "sd3": [("transformer_blocks.0", 2), ("transformer_blocks.1", 1)],  # last block: context_pre_only
    "flux": [("transformer_blocks.0", 2), ("single_transformer_blocks.0", 2), ("single_transformer_blocks.1", 1)],
    "sana": [("transformer_blocks.0", 1), ("transformer_blocks.1", 1)],
}


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_find_blocks_on_diffusers_families(family):
    model, kwargs = zoo.build(family)
    gm = capture(model, kwargs)
    found = find_blocks(gm)
    assert [(r.name, len(r.stream_outputs)) for r in found.regions] == EXPECTED[family]
    assert found.left_alone == []
    for r in found.regions:
        for h, y in zip(r.stream_inputs, r.stream_outputs):
            assert h.meta["example_value"].shape == y.meta["example_value"].shape
            assert len(y.meta["example_value"].shape) == 3
    if family == "pixart":  # the cross-attention states are context, read by every block
        assert all(any("encoder_hidden_states" in c.name for c in r.context_inputs) for r in found.regions)
    if family == "dit":  # DiT reuses transformer_blocks[0].norm1.emb for its output layer: glue, not a block
        names = [n.name for n in found.regions[0].nodes]
        assert len(names) == len(found.regions[1].nodes)


def _hand_written_graph() -> fx.GraphModule:
    """Two 'blocks' in a ModuleList, traced by hand-setting nn_module_stack (no diffusers)."""
    class Block(torch.nn.Module):
        pass

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 4, 8)
    w = g.placeholder("l_self_modules_blocks_modules_0_parameters_weight_")
    w.meta["val"] = torch.nn.Parameter(torch.empty(8, 8))
    h = x
    for i in range(2):
        stack = {"b": (f"blocks.{i}", Block)}
        lin = g.call_function(torch.nn.functional.linear, (h, w))
        lin.meta.update(nn_module_stack=stack, val=torch.empty(2, 4, 8))
        add = g.call_function(operator.add, (h, lin))
        add.meta.update(nn_module_stack=stack, val=torch.empty(2, 4, 8))
        h = add
    out = g.call_function(torch.relu, (h,))
    out.meta["val"] = torch.empty(2, 4, 8)
    g.output((out,))
    return fx.GraphModule(torch.nn.Module(), g)


def test_pass_on_hand_written_graph():
    gm = _hand_written_graph()
    found = find_blocks(gm)
    assert [r.name for r in found.regions] == ["blocks.0", "blocks.1"]
    assert found.regions[1].stream_inputs == [found.regions[0].stream_outputs[0]]
    before = gm.code
    new, res = apply_block_cache(gm, FastCacheConfig())
    assert gm.code == before  # pure: input graph untouched
    conds = [n for n in new.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 2 and res.blocks == ["blocks.0", "blocks.1"]
    # state: step, prev_t, t_first, the output budget's (gain, run, step error), then per block
    # anchor_in, anchor_res, consecutive
    assert [s.name for s in res.state][:9] == ["step", "prev_t", "t_first", "output.gain", "output.run_error",
                                               "output.step_error", "blocks.0.anchor_in.0", "blocks.0.anchor_res.0",
                                               "blocks.0.consecutive"]
    n_out = len(next(n for n in new.graph.nodes if n.op == "output").args[0])
    assert n_out == 1 + len(res.state) + 3


def test_module_without_blocks_has_no_region():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1])(torch.randn(2, 4, 8))
    assert find_blocks(graphs[0]).regions == []


class _TransposedStreamModel(torch.nn.Module):
    """A conv patch embedding ending in ``flatten(2).transpose(1, 2)`` (Wan's) feeds the first
    block directly: the block's stream input is a [B, N, D] value laid out as [B, D, N]."""

    def __init__(self):
        super().__init__()
        self.patch = torch.nn.Conv3d(4, 24, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(24), torch.nn.Linear(24, 24))
                                          for _ in range(2))

    def forward(self, x, timestep):
        h = self.patch(x).flatten(2).transpose(1, 2)
        for blk in self.blocks:
            h = h + blk(h) * timestep.float().view(-1, 1, 1) / 1000
        return h.sum(-1)


def test_transposed_stream_input_compiles_and_matches_eager():
    """Inductor keeps a fused ``.contiguous()`` in its input's transposed layout unless the cond
    operand's layout is fixed: the branch's stride assertion failed at run time (Wan family)."""
    model = _TransposedStreamModel().eval().requires_grad_(False)
    x, t = torch.randn(1, 4, 2, 8, 8), torch.tensor([500])
    gm, _ = __import__("conftest").dynamo_graph(model, dict(x=x, timestep=t))
    region = find_blocks(gm).regions[0]
    assert not region.stream_inputs[0].meta["example_value"].is_contiguous()
    new, _ = apply_block_cache(gm, FastCacheConfig())
    cond = next(n for n in new.graph.nodes if n.target is torch.ops.higher_order.cond)
    assert all(getattr(o.target, "__name__", "") == "fixed_contiguous" for o in cond.args[3][:1])
    torch._dynamo.reset()
    # the per-block error rule's budget keeps every step of this toy model full: outputs equal eager
    compiled = torch.compile(model, backend="fastcache", options={"decision": "error"})
    for step, ts in enumerate((900, 800, 700, 600)):
        t = torch.tensor([ts])
        torch.testing.assert_close(compiled(x, t), model(x, t), rtol=1e-4, atol=1e-5)


class _Rotated(torch.nn.Module):
    """A block with a rotary-like context input: ``h * cos``, cos [B, N, D] taken as given."""

    def __init__(self):
        super().__init__()
        self.norm, self.proj = torch.nn.LayerNorm(24), torch.nn.Linear(24, 24)

    def forward(self, h, cos):
        return h + self.proj(self.norm(h)) * cos


class _StridedInputsModel(torch.nn.Module):
    """Blocks fed by graph inputs with strided layouts, as a graph resumed after a graph break or a
    regional block graph gets them: the stream a transposed [B, N, D] (HunyuanVideo 1.5), the context
    a ``[..., 0::2]`` slice whose stride order is contiguous (Wan's rotary under context parallelism)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Rotated() for _ in range(2))

    def forward(self, h, cos, timestep):
        for blk in self.blocks:
            h = blk(h, cos) * (1 + timestep.float().view(-1, 1, 1) / 1000)
        return h


def test_strided_graph_inputs_are_copied_contiguous_for_the_cond():
    """Inductor kept both layouts into the branches (a bare clone of the transposed input was laid
    out transposed again; fixed_contiguous keeps a view of contiguous stride order), whose stride
    assertions then failed at run time."""
    model = _StridedInputsModel().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 24, 16, generator=g).transpose(1, 2)  # [1, 16, 24] laid out as [1, 24, 16]
    cos = torch.randn(1, 16, 48, generator=g)[..., 0::2]  # [1, 16, 24], strides (768, 48, 2)
    gm, _ = __import__("conftest").dynamo_graph(model, dict(h=h, cos=cos, timestep=torch.tensor([500])))
    new, _ = apply_block_cache(gm, FastCacheConfig())
    cond = next(n for n in new.graph.nodes if n.target is torch.ops.higher_order.cond)
    for o in cond.args[3][:2]:  # the stream and the context: a copy, then its layout fixed
        assert o.target.__name__ == "fixed_contiguous" and o.args[0].target is torch.clone
    import fastcache_fx

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fastcache", options={"cache_ratio_threshold": 10.0})
    steps = [(torch.tensor([ts]), h * (1 + ts / 1e4)) for ts in (900, 800, 700, 600, 500)]  # layouts kept
    with fastcache_fx.replay_decisions(compiled, [[False]], then="full"):  # every block computed
        for t, hs in steps:
            torch.testing.assert_close(compiled(hs, cos, t), model(hs, cos, t), rtol=1e-4, atol=1e-5)
    fastcache_fx.reset(compiled)
    assert all(torch.isfinite(compiled(hs, cos, t)).all() for t, hs in steps)  # live: the approximate branch runs
    assert sum(sum(s["approx"]) for s in fastcache_fx.stats(compiled)["trace"]) > 0
