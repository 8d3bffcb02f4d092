"""Real diffusers pipelines, built offline from tiny random parts (``zoo.pipeline``), with
``enable_fastcache``: DiT, PixArt-Sigma, SD3, Flux (true CFG: cond and uncond under diffusers'
``cache_context``) and Sana; and what users do around them: CPU offload, LoRA, threads,
exceptions (issue: real pipelines, every resolution).

Compile budget: each family's pipelines are compiled once for the module (``Family``); the
offload and LoRA tests compile graphs that Inductor's caches mostly already hold.
"""

import threading

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from conftest import rel_err

STEPS = 4
# pixel sizes: the first compiles a static graph, the second one with symbolic shapes
SIZES = {"dit": (16, 24), "pixart": (16, 24), "sd3": (16, 24), "flux": (16, 24), "sana": (32, 64)}
# Inductor vs eager on these tiny fp32 models: 2e-7..2e-6 relative here (other CPUs' vector
# widths reorder sums a little more); a block computed wrongly or skipped gives > 1e-2
TOL = 1e-4
# Block inputs of tiny random models move 15-500 % per step at 4 steps (PixArt's DPM-Solver on
# random noise predictions inflates its latents); trained models move a few per cent. tau = 10
# accepts nearly any change, so every block is approximated once warmup is over (step 2, and
# step 3 but for PixArt): these tests check that decisions, warmup and trajectories work
# through the pipelines, not the decision rule (tests/test_decision.py).
APPROX = {"cache_ratio_threshold": 10.0}
# Flux calls the transformer twice per step (true CFG); the others batch cond and uncond
CONTEXTS = {"flux": ("cond", "uncond")}


class Family:
    """A family's uncompiled pipeline and two compiled ones with the same weights:
    ``off`` (enable_block_approx=False) and ``on`` (approximation on)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sizes = SIZES[name]
        self.contexts = CONTEXTS.get(name, ("default",))
        self.eager, self.kwargs = self.build()
        self.off = fastcache_fx.enable_fastcache(self.build()[0], enable_block_approx=False)
        self.on = fastcache_fx.enable_fastcache(self.build()[0], **APPROX)
        self._refs = {}

    def build(self):
        return zoo.pipeline(self.name, num_layers=1, steps=STEPS)

    def run(self, pipe, size=None, **kw):
        return zoo.run_pipeline(pipe, self.kwargs, size or self.sizes[0], **kw)

    def ref(self, size=None):
        """The uncompiled pipeline's images at ``size`` (cached)."""
        size = size or self.sizes[0]
        if size not in self._refs:
            self._refs[size] = self.run(self.eager, size)
        return self._refs[size]


@pytest.fixture(scope="module", autouse=True)
def _dynamo():
    # Every model that enable_fastcache hooks runs diffusers' hook wrapper `new_forward`: one
    # code object whose cache entries (one per backend, per shape kind) all count against
    # Dynamo's recompile_limit of 8; this module compiles ~20 graphs (a user process with many
    # pipelines meets the same limit: docs/pipelines.md, "Around the pipeline")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


_FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    if name not in _FAMILIES:
        _FAMILIES[name] = Family(name)
    return _FAMILIES[name]


def fresh_shapes():
    """Forget the input sizes Dynamo remembered, as in a new process. Automatic dynamic shapes
    work per code object, and every model hooked by enable_fastcache runs diffusers'
    ``new_forward``: another family's sizes would make this one's first graph symbolic (which
    broke Flux in an earlier version)."""
    torch._dynamo.reset_code_state()


@pytest.fixture(scope="module", params=zoo.FAMILIES)
def fam(request):
    """One family; pytest runs its tests together, so its first graph is compiled after
    ``fresh_shapes`` (static) and its second resolution recompiles with symbolic shapes."""
    fresh_shapes()
    return family(request.param)


def trace_by_context(pipe):
    """{context: [(step, approx list)]} of the calls since the last reset."""
    out = {}
    for r in fastcache_fx.stats(pipe)["trace"]:
        out.setdefault(r["context"], []).append((r["step"], r["approx"]))
    return out


def full(n_blocks):
    return [False] * n_blocks


# --- each pipeline family ---------------------------------------------------------------------

def test_without_approximation_equals_uncompiled(fam):
    fastcache_fx.reset(fam.off)
    out = fam.run(fam.off)
    assert rel_err(out, fam.ref()) < TOL
    st = fastcache_fx.stats(fam.off)
    assert st["graphs"] == 1 and st["fallback"] == [] and st["block_approx_ratio"] == 0.0
    # the rewritten graph ran every step of every context
    assert {c: v["steps"] for c, v in st["trajectory"].items()} == {c: STEPS for c in fam.contexts}


def test_blocks_approximated_and_every_call_a_new_trajectory(fam):
    fastcache_fx.reset(fam.on)
    first = fam.run(fam.on)
    second = fam.run(fam.on)
    st = fastcache_fx.stats(fam.on)
    n = len(st["blocks"])
    assert n >= 1 and st["fallback"] == [] and st["block_approx_ratio"] > 0
    # per context, per call: steps 0..3, warmup (2 steps) computed fully, then step 2
    # approximated (step 3 too, except where PixArt's inflating latents exceed even tau = 10);
    # both calls decide alike
    trace = trace_by_context(fam.on)
    assert set(trace) == set(fam.contexts)
    for steps in trace.values():
        assert [s for s, _ in steps] == [0, 1, 2, 3] * 2 and steps[:4] == steps[4:]
        assert steps[0][1] == steps[1][1] == full(n) and steps[2][1] == [True] * n
    # nothing of the first call's cache reached the second: same images
    assert rel_err(second, first) < 1e-6
    # the approximations reach the images, far beyond Inductor's rounding (PixArt's inflated
    # latents make one approximated step a small relative change: 6e-5 vs 5e-7)
    assert rel_err(first, fam.ref()) > 10 * max(rel_err(fam.run(fam.off), fam.ref()), 1e-7)


def test_second_resolution_keeps_the_cache(fam):
    fam.run(fam.on)  # the static graph of the first size exists (also when run alone)
    size = fam.sizes[1]
    fastcache_fx.reset(fam.on)
    fam.run(fam.on, size)
    st = fastcache_fx.stats(fam.on)
    live = [g for g in st["per_graph"] if g["steps"]]
    # Dynamo recompiled once with symbolic shapes; that graph carries the cache
    assert len(live) == 1 and live[0]["dynamic"] and live[0]["fallback"] is None
    assert live[0]["steps"] == STEPS * len(fam.contexts) and live[0]["block_approx_ratio"] > 0
    assert all(v["block_approx_ratio"] > 0 for v in st["trajectory"].values()) and st["fallback"] == []
    # the symbolic graph computes correctly at this size: every step forced full equals eager
    with fastcache_fx.replay_decisions(fam.on, [[False]], then="full"):
        out = fam.run(fam.on, size)
    assert rel_err(out, fam.ref(size)) < TOL
    assert fastcache_fx.stats(fam.on)["graphs"] == st["graphs"]  # no further compile


class _Abort(Exception):
    pass


def _raise_at(pipe, step: int):
    """Make ``pipe.scheduler.step`` raise after the transformer call(s) of denoising ``step``."""
    calls = {"n": 0}
    orig = pipe.scheduler.step

    def step_fn(*a, **k):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise _Abort(f"abort at step {step}")
        return orig(*a, **k)

    pipe.scheduler.step = step_fn
    return lambda: delattr(pipe.scheduler, "step")


def test_exception_mid_trajectory_leaves_no_stale_cache(fam):
    fastcache_fx.reset(fam.on)
    clean = fam.run(fam.on)
    restore = _raise_at(fam.on, 2)  # after the first approximated step
    try:
        with pytest.raises(_Abort):
            fam.run(fam.on, seed=1)
    finally:
        restore()
    after = fam.run(fam.on)
    trace = trace_by_context(fam.on)
    n = len(fastcache_fx.stats(fam.on)["blocks"])
    for c in fam.contexts:
        assert [s for s, _ in trace[c]] == [0, 1, 2, 3] + [0, 1, 2] + [0, 1, 2, 3]
        assert trace[c][7] == (0, full(n))  # the next call starts over, fully computed
    assert rel_err(after, clean) < 1e-6


# --- around the pipeline ----------------------------------------------------------------------

def test_two_threads_two_pipelines():
    """Pipelines of their own models called at once: no shared state, both as when run alone
    (two families, and two pipelines of one class with different options)."""
    pipes = {("flux", "on"): family("flux").on, ("dit", "on"): family("dit").on, ("dit", "off"): family("dit").off}
    alone = {}
    for (name, kind), pipe in pipes.items():
        fastcache_fx.reset(pipe)
        alone[name, kind] = [family(name).run(pipe, seed=s) for s in (0, 1)]
    results, errors = {}, []
    barrier = threading.Barrier(len(pipes))

    def work(key, pipe):
        try:
            fastcache_fx.reset(pipe)
            barrier.wait()
            results[key] = [family(key[0]).run(pipe, seed=s) for s in (0, 1)]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k, p)) for k, p in pipes.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, pipe in pipes.items():
        for got, want in zip(results[key], alone[key]):
            assert rel_err(got, want) < 1e-6, key
        # each model's trace holds its own two trajectories only
        ctxs = family(key[0]).contexts
        assert {c: [s for s, _ in v] for c, v in trace_by_context(pipe).items()} == {c: [0, 1, 2, 3] * 2 for c in ctxs}


@pytest.mark.parametrize("order", ["after", "before"])
def test_model_cpu_offload(order):
    """``enable_model_cpu_offload`` with accelerate's hooks, before or after enable_fastcache.

    On a CPU-only machine the offload device must be given (``device="cpu"``; without it
    diffusers raises "requires accelerator"): the hooks run (moving to and from the same
    device), and the pipeline removes and re-adds them after every call, which is what broke
    the "before" order (``api._suspend_model_offload``). Moving weights between devices needs
    an accelerator and is not exercised here."""
    fam = family("sana")
    if order == "after":
        pipe = fam.off  # compiled by the family tests already (else here)
        fam.run(pipe)
    else:
        fresh_shapes()
        pipe = fam.build()[0]
        pipe.enable_model_cpu_offload(device="cpu")
        fastcache_fx.enable_fastcache(pipe, enable_block_approx=False)
    try:
        if order == "after":
            pipe.enable_model_cpu_offload(device="cpu")
        assert hasattr(pipe.transformer, "_orig_mod")
        fastcache_fx.reset(pipe)
        graphs = max(1, fastcache_fx.stats(pipe)["graphs"])
        for _ in range(2):
            assert rel_err(fam.run(pipe), fam.ref()) < TOL
        # both calls ran the compiled graph (the hooks did not restore the eager forward)
        st = fastcache_fx.stats(pipe)
        assert st["graphs"] == graphs and st["steps"] == 2 * STEPS
    finally:
        pipe.remove_all_hooks()


def _lora_state_dict(name: str) -> dict:
    """A random rank-2 LoRA on the attention projections of ``name``'s tiny transformer, as
    ``pipe.load_lora_weights`` takes it (keys "transformer.<module>.lora_A.weight" ...); peft's
    default zero init of B is replaced by random values so that the LoRA changes outputs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(1)
    tr = zoo.pipeline(name, num_layers=1)[0].transformer
    tr.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    return {f"transformer.{k}": v.clone() for k, v in get_peft_model_state_dict(tr).items()}


def test_lora_after_compiling():
    """A LoRA loaded after enable_fastcache, even in the middle of a trajectory (from
    callback_on_step_end), then fused. Dynamo guards on the module structure (peft layers
    replace nn.Linear) and on peft's ``merged`` flag: each change recompiles, and a new graph
    drops the cache, so no approximated step uses an anchor from before the change. Computed
    fully, the images equal the uncompiled pipeline with the same LoRA."""
    fresh_shapes()
    fam = family("sana")
    lora = _lora_state_dict("sana")
    pipe = fastcache_fx.enable_fastcache(fam.build()[0], **APPROX)
    eager = fam.build()[0]
    eager.load_lora_weights(dict(lora), adapter_name="tiny")
    want = fam.run(eager)
    assert rel_err(want, fam.ref()) > 1e-2  # the LoRA matters

    def load_at_step_1(p, i, t, kw):
        if i == 1:
            p.load_lora_weights(dict(lora), adapter_name="tiny")
        return kw

    fam.run(pipe, callback_on_step_end=load_at_step_1)
    st = fastcache_fx.stats(pipe)
    n = len(st["blocks"])
    # steps 0, 1 with the old weights; then a new trajectory on the new graph, warmup again
    assert [(r["step"], r["approx"]) for r in st["trace"]] == [(0, full(n)), (1, full(n))] * 2
    assert st["graphs"] == 2 and [g["steps"] for g in st["per_graph"]] == [2, 2]
    # the next call approximates as usual on the LoRA graph
    fastcache_fx.reset(pipe)
    fam.run(pipe)
    assert [a for _, a in trace_by_context(pipe)["default"]][:3] == [full(n)] * 2 + [[True] * n]
    # every decision forced to a full computation: the uncompiled pipeline with the LoRA
    with fastcache_fx.replay_decisions(pipe, [[False]], then="full"):
        assert rel_err(fam.run(pipe), want) < TOL
    # pipe.fuse_lora() skips a compiled transformer (diffusers 0.42 fuses only ModelMixin
    # components; the images stay right, unfused): fuse on the transformer, which the compiled
    # module forwards to its original
    eager.fuse_lora()
    pipe.transformer.fuse_lora()
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.merged
    with fastcache_fx.replay_decisions(pipe, [[False]], then="full"):
        assert rel_err(fam.run(pipe), fam.run(eager)) < TOL
    assert fastcache_fx.stats(pipe)["graphs"] == 3


@pytest.mark.xfail(reason="a trajectory cut short (exception or pipe._interrupt) followed by a call whose schedule "
                          "starts below the last timestep (img2img strength < 1, custom sigmas) continues the old "
                          "trajectory: the new trajectory is detected only by a timestep that stops decreasing",
                   strict=True)
def test_cut_trajectory_then_lower_schedule_starts_over():
    fam = family("flux")
    fastcache_fx.reset(fam.on)
    restore = _raise_at(fam.on, 1)  # stopped at sigma 1.0, 0.75
    try:
        with pytest.raises(_Abort):
            fam.run(fam.on)
    finally:
        restore()
    fam.run(fam.on, sigmas=[0.5, 0.4, 0.3, 0.2])  # e.g. an img2img call at strength 0.5
    trace = trace_by_context(fam.on)
    assert [s for s, _ in trace["cond"]][2:] == [0, 1, 2, 3]
