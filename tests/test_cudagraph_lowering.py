"""lowering="inductor_split" (lowering/inductor_split.py): the step level cut at its decision into
pieces free of control flow, each compiled by Inductor (each a CUDA graph on CUDA), one host read
of the decision per step; on CPU it computes exactly what the whole-graph lowering computes.

The default tier checks a tiny DiT over a short trajectory with a mix of decisions (and, from the
same compile, that every piece takes the model's weights as static inputs, which a CUDA graph then
reads in place); the slow tier the bundled reference DiT over a 50-step DDIM trajectory.
"""

import logging

import pytest
import torch

import fastcache_fx
from fastcache_fx import reference, zoo
from fastcache_fx.compat import Target, check
from fastcache_fx.config import FastCacheConfig
from fastcache_fx.lowering.inductor_split import piece_mode, uses_cudagraphs
from fastcache_fx.runtime import registry

LAYERS = 3
OPTIONS = dict(cache_level="step", decision="chi2", cache_ratio_threshold=0.2, warmup_steps=1,
               max_consecutive_approx=2)
#: timestep and drift of the input per step: small drifts (approximated), then a jump (recomputed)
STEPS = [(900, 0.0), (890, 0.01), (880, 0.02), (870, 0.03), (860, 2.0), (850, 2.01), (840, 2.02)]


class _StaticIdx(logging.Handler):
    """Inductor's static input indices per compiled graph (its ``cudagraph_static_inputs`` log)."""

    def __init__(self):
        super().__init__()
        self.idxs: list[list[int]] = []

    def emit(self, record):
        if record.getMessage().startswith("static input idxs compile_fx_inner:"):
            self.idxs.append(list(record.args[0]))


def _trajectory(compiled, model, kw):
    fastcache_fx.reset(model)
    x, labels = kw["hidden_states"], kw["class_labels"]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    outs = [compiled(x + d * noise, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample.clone()
            for t, d in STEPS]
    return outs, [t["approx"] for t in fastcache_fx.stats(model)["trace"]]


def _program(model):
    return next(g.compiled for g in registry.lookup(model).graphs if hasattr(g.compiled, "pieces"))


@pytest.fixture(scope="module")
def runs():
    """The tiny DiT's trajectory under the whole-graph lowering and under the split one (the
    latter with mode="reduce-overhead": on CPU no CUDA graph, but the program copies its outputs
    out as it does on CUDA), and the split's static input indices."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=LAYERS)
    whole = _trajectory(torch.compile(model, backend=fastcache_fx.FastCacheBackend(**OPTIONS), dynamic=False),
                        model, kw)
    torch._dynamo.reset()
    handler = _StaticIdx()
    log = logging.getLogger("torch._inductor.compile_fx.__cudagraph_static_inputs")
    torch._logging.set_logs(cudagraph_static_inputs=True)
    log.addHandler(handler)
    try:
        split_model = torch.compile(model, backend=fastcache_fx.FastCacheBackend(
            lowering="inductor_split", mode="reduce-overhead", **OPTIONS), dynamic=False)
        split = _trajectory(split_model, model, kw)
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
    return model, kw, whole, split, _program(model), handler.idxs


def test_split_equals_whole_graph_with_one_host_read_per_step(runs):
    model, _, (w_outs, w_dec), (s_outs, s_dec), prog, _ = runs
    assert s_dec == w_dec
    assert any(d[0] for d in w_dec) and not all(d[0] for d in w_dec)  # a real mix of decisions
    for a, b in zip(s_outs, w_outs):
        assert (a - b).abs().max().item() <= 1e-6  # equal on this machine; Inductor may fuse the cut
    # front block + decision | the span (approx or full) | tail: no cond left in any piece
    assert [p.kind for p in prog.pieces] == ["glue", "block", "glue"]
    assert prog.pieces[1].name == "transformer_blocks.1-2"
    assert not any(n.target is torch.ops.higher_order.cond
                   for p in prog.pieces for m in p.modules.values() for n in m.graph.nodes)
    assert prog.host_reads == len(STEPS)
    assert prog.branches["transformer_blocks.1-2"]["approx"] == sum(d[0] for d in s_dec)
    assert prog.copy_outputs  # mode="reduce-overhead": outputs and state are copied out of the pool


def test_pieces_take_the_weights_as_static_inputs(runs):
    """Each piece's weight inputs (the model's parameters and buffers, found by storage) are static
    for Inductor's CUDA-graph wrapper (read in place at a replay), the other inputs are not (copied
    into the graph's buffers): the pieces carry the Dynamo metadata AOTAutograd reads."""
    model, _, _, _, prog, idxs = runs
    ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    compiled = [p.example_inputs for p in prog.pieces for _ in p.modules]  # compile order
    assert len(idxs) == len(compiled) == 4
    for ins, static in zip(compiled, idxs):
        weights = {i for i, x in enumerate(ins) if x.data_ptr() in ptrs}
        assert weights and set(static) == weights


def test_options_it_cannot_run_are_refused():
    with pytest.raises(ValueError, match="FastCacheConfig.lowering"):
        FastCacheConfig(lowering="inductor_split")  # the block level (the default)
    cfg = FastCacheConfig(lowering="inductor_split", cache_level="step")
    for target in (Target(block_graph=True), Target(dynamic=True), Target(collectives=True)):
        with pytest.raises(ValueError, match="FastCacheConfig.lowering: 'inductor_split'"):
            check(cfg, target)
    assert check(FastCacheConfig(lowering="inductor_split", cache_level="span"), Target()).lowering == "inductor_split"


def test_piece_mode():
    assert piece_mode(None, torch.device("cuda")) == "reduce-overhead"
    assert piece_mode(None, torch.device("cpu")) is None
    assert piece_mode("max-autotune-no-cudagraphs", torch.device("cuda")) == "max-autotune-no-cudagraphs"
    assert uses_cudagraphs("reduce-overhead") and uses_cudagraphs("max-autotune")
    assert not uses_cudagraphs(None) and not uses_cudagraphs("max-autotune-no-cudagraphs")


def test_dynamic_shapes_refused():
    """dynamic=True: refused (a CUDA graph replays one shape), the message says what serves shapes."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=2)
    with pytest.raises(Exception, match="FastCacheConfig.lowering: 'inductor_split' needs static shapes"):
        torch.compile(model, backend=fastcache_fx.FastCacheBackend(lowering="inductor_split", **OPTIONS),
                      dynamic=True)(**kw)
    torch._dynamo.reset()


@pytest.mark.slow
def test_one_piece_set_per_shape():
    """dynamic=False: Dynamo compiles the model once per shape, each graph its own pieces."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=2)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(lowering="inductor_split", **OPTIONS),
                             dynamic=False)
    for b in (2, 1):
        args = kw["hidden_states"][:b], kw["timestep"][:b], kw["class_labels"][:b]
        out = compiled(args[0], timestep=args[1], class_labels=args[2]).sample
        assert torch.allclose(out, model(args[0], timestep=args[1], class_labels=args[2]).sample, atol=1e-5)
    progs = [g.compiled for g in registry.lookup(model).graphs if hasattr(g.compiled, "pieces")]
    assert len(progs) == 2 and progs[0] is not progs[1]
    torch._dynamo.reset()


CLASSES = [3, 7]


def _reference_run(model, lowering):
    torch._dynamo.reset()
    fastcache_fx.reset(model)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(cache_level="step", lowering=lowering),
                             dynamic=False)
    outs = []

    def rec(*a, **k):
        o = compiled(*a, **k)
        outs.append(o.sample.clone())
        return o

    images = reference.sample(rec, CLASSES, num_inference_steps=50, seed=0)
    trace = [t["approx"] for t in fastcache_fx.stats(model)["trace"]]
    torch._dynamo.reset()
    return outs, images, trace


@pytest.mark.slow
def test_reference_dit_50_steps_equal_whole_graph():
    """The bundled DiT, 50 DDIM steps with CFG (batch 4), the default rule at the step level: the
    same decisions at every step and the same outputs and images as the whole-graph lowering."""
    model = reference.load()
    w_outs, w_img, w_dec = _reference_run(model, "inductor")
    s_outs, s_img, s_dec = _reference_run(model, "inductor_split")
    assert len(s_dec) == 50 and s_dec == w_dec
    assert any(d[0] for d in w_dec) and not all(d[0] for d in w_dec)
    for a, b in zip(s_outs, w_outs):
        assert (a - b).abs().max().item() <= 1e-6
    assert (s_img - w_img).abs().max().item() <= 1e-6
