"""Regional compilation: one compiled graph per block class, the cache state per block instance."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.runtime import registry
from conftest import rel_err
from test_backend import FAMILY_TIMESTEPS

# block graphs Dynamo compiles per family at batch 1: one per block class, except where the
# first block's input has another layout (DiT/PixArt: the patch embedding's output is
# transposed, so Dynamo recompiles once for the contiguous inputs of later blocks) or the block
# runs another code path (SD3's last block is context_pre_only)
GRAPHS_PER_CLASS = {"dit": {"BasicTransformerBlock": 2}, "pixart": {"BasicTransformerBlock": 2},
                    "sd3": {"JointTransformerBlock": 2},
                    "flux": {"FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}}


def _graphs_per_class(model) -> dict:
    reg = registry.lookup(model).regional
    out = {}
    for g in reg.graphs:
        out[g.cls] = out.get(g.cls, 0) + 1
    return out


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_regional_equals_model_with_approximation_off(family):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, kw = zoo.build(family, batch=1)
    ref, _ = zoo.build(family, batch=1)  # same seed: same weights, never compiled
    fastcache_fx.enable_fastcache(model, regional=True, enable_block_approx=False)
    for t in FAMILY_TIMESTEPS[family]:
        kw["timestep"] = torch.full_like(kw["timestep"], t)
        kw["hidden_states"] = kw["hidden_states"] + 0.01 * torch.randn_like(kw["hidden_states"])
        assert rel_err(model(**kw).sample, ref(**kw).sample) < 1e-4
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    assert _graphs_per_class(model) == GRAPHS_PER_CLASS[family]
    st = fastcache_fx.stats(model)
    assert st["steps"] == 3 and st["block_approx_ratio"] == 0.0
    assert [t["step"] for t in st["trace"]] == [0, 1, 2]
    assert len(st["blocks"]) == len(zoo_blocks(model)) and st["per_graph"][0]["kind"] == "regional"


def zoo_blocks(model):
    return [n for n, m in model.named_modules() if type(m).__name__.endswith("Block") and "." in n]


def test_regional_decisions_and_outputs_equal_whole_graph():
    """The scripted trace of the whole-graph tests gives the same decisions in regional mode, and
    the same outputs: each block instance approximates from its own anchor (no shared state)."""
    opts = dict(cache_ratio_threshold=0.05, warmup_steps=2, max_consecutive_approx=2)
    torch._dynamo.reset()
    whole, kw = zoo.build("dit")
    regional, _ = zoo.build("dit")
    whole_c = torch.compile(whole, backend=fastcache_fx.FastCacheBackend(**opts), dynamic=False)
    fastcache_fx.enable_fastcache(regional, regional=True, **opts)
    x, labels = kw["hidden_states"], kw["class_labels"]
    inputs = [x] * 5 + [x + 3.0 * torch.randn_like(x)]
    for xi, t in zip(inputs, [900, 800, 700, 600, 500, 400]):
        a = whole_c(xi, timestep=torch.full((2,), t), class_labels=labels).sample
        b = regional(xi, timestep=torch.full((2,), t), class_labels=labels).sample
        assert rel_err(b, a) < 1e-4
    got = [t["approx"] for t in fastcache_fx.stats(regional)["trace"]]
    F, T = [False, False], [True, True]
    assert got == [F, F, T, T, F, F] == [t["approx"] for t in fastcache_fx.stats(whole)["trace"]]
    reg = registry.lookup(regional).regional
    assert {name for name, _ in reg.states} == {"transformer_blocks.0", "transformer_blocks.1"}
    # reset: states and statistics gone, the next step is a full computation at step 0
    fastcache_fx.reset(regional)
    assert fastcache_fx.stats(regional)["steps"] == 0 and not reg.states
    regional(x, timestep=torch.full((2,), 300), class_labels=labels)
    last = fastcache_fx.stats(regional)["trace"][-1]
    assert last["step"] == 0 and last["approx"] == F
    # contexts have their own state
    with fastcache_fx.cache_context("uncond"):
        regional(x, timestep=torch.full((2,), 900), class_labels=labels)
    assert {c for _, (_, c) in reg.states} == {"default", "uncond"}  # keys: (block, (request, context))


def test_compile_repeated_blocks_with_fastcache_backend():
    """diffusers' own API: Flux is the family that defines _repeated_blocks. Without
    enable_fastcache the steps are counted from the blocks' call order."""
    torch._dynamo.reset()
    model, kw = zoo.build("flux", batch=1)
    # chi2: repeated inputs give block 0 delta = 0, which the error rule never approximates (no slope)
    model.compile_repeated_blocks(backend="fastcache", options={"warmup_steps": 1, "max_consecutive_approx": 5,
                                                                "decision": "chi2"})
    for t in (0.9, 0.8, 0.7):
        kw["timestep"] = torch.full_like(kw["timestep"], t)
        model(**kw)
    st = fastcache_fx.stats(model)
    assert [t["step"] for t in st["trace"]] == [0, 1, 2]
    assert st["trace"][0]["approx"] == [False] * 3 and st["trace"][2]["approx"] == [True] * 3
    assert st["blocks"] == ["FluxTransformerBlock.0", "FluxSingleTransformerBlock.0", "FluxSingleTransformerBlock.1"]
    fastcache_fx.reset(model)


def test_regional_refuses_token_passes():
    model, _ = zoo.build("dit")
    for opt in ("enable_spatial_approx", "enable_token_merge"):
        with pytest.raises(ValueError, match=opt):
            fastcache_fx.enable_fastcache(model, regional=True, **{opt: True})


@pytest.mark.parametrize("opts", [{"approx": "linear"}, {"approx": "taylor", "decision": "error", "error_budget": 0.5}])
def test_regional_options_equal_whole_graph(opts, tmp_path):
    """Calibrated maps (loaded per block instance), the forecast and the error rule give the same
    decisions and outputs per block as the whole-graph mode."""
    torch._dynamo.reset()
    whole, kw = zoo.build("dit")
    regional, _ = zoo.build("dit")
    x, labels = kw["hidden_states"], kw["class_labels"]
    steps = [(x + 0.02 * i * torch.randn_like(x), t) for i, t in enumerate([900, 800, 700, 600, 500])]
    opts = dict(opts, warmup_steps=1, max_consecutive_approx=10)
    replay = None
    if opts["approx"] == "linear":
        path = tmp_path / "cal.safetensors"
        fastcache_fx.calibrate(whole, lambda m: [m(xi, timestep=torch.full((2,), t), class_labels=labels)
                                                 for xi, t in steps], out=path)
        opts["calibration"] = str(path)
        replay = [[True, True]] * len(steps)  # every block with an anchor approximated by its own map
    whole_c = torch.compile(whole, backend=fastcache_fx.FastCacheBackend(**opts), dynamic=False)
    fastcache_fx.enable_fastcache(regional, regional=True, **opts)
    for fn, model in ((whole_c, whole), (regional, regional)):
        fastcache_fx.reset(model)
        outs = []
        if replay is not None:
            with fastcache_fx.replay_decisions(model, replay):
                outs = [fn(xi, timestep=torch.full((2,), t), class_labels=labels).sample for xi, t in steps]
        else:
            outs = [fn(xi, timestep=torch.full((2,), t), class_labels=labels).sample for xi, t in steps]
        model._outs = outs
    for a, b in zip(whole._outs, regional._outs):
        assert rel_err(b, a) < 1e-4
    tw = [t["approx"] for t in fastcache_fx.stats(whole)["trace"]]
    assert tw == [t["approx"] for t in fastcache_fx.stats(regional)["trace"]] and any(any(r) for r in tw)


def test_regional_block_with_aliased_stream_inputs():
    """CogVideoX's blocks get their two streams as slices of one tensor: cond refused the aliased
    operands (compile error); each now gets its own copy, and the output with approximation off
    equals eager while live decisions approximate."""
    from fastcache_fx import zoo_classes as Z

    name = "CogVideoXTransformer3DModel"
    model = Z.build(name)[0]
    steps = Z.trajectory(name, 4)
    torch._dynamo.reset()
    off = fastcache_fx.enable_fastcache(Z.build(name)[0], regional=True, enable_block_approx=False)
    assert rel_err(Z.output_tensor(off(**steps[0])), Z.output_tensor(model(**steps[0]))) < 1e-4
    torch._dynamo.reset()
    live = fastcache_fx.enable_fastcache(Z.build(name)[0], regional=True, decision="chi2", cache_ratio_threshold=10.0)
    for kw in steps:
        live(**kw)
    assert fastcache_fx.stats(live)["block_approx_ratio"] > 0
