"""Real diffusers video pipelines, built offline from tiny random parts (``zoo_video``), with
``enable_fastcache``: Wan (cond and uncond as separate calls), Wan 2.2 (two experts switched at
``boundary_ratio``), HunyuanVideo 1.5 (its guider's ``pred_cond`` / ``pred_uncond`` calls), LTX
and CogVideoX (batched CFG). The checks of tests/test_pipelines.py: approximation off equals the
uncompiled pipeline, blocks approximated with every call a new trajectory, a second frame count
keeps the cache; and each expert of Wan 2.2 its own cache state.

Compile budget: each family's compiled pipeline is built once for the module; "approximation
off" is that pipeline with every decision forced full (``replay_decisions``), so one compiled
graph serves both checks.
"""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo_video
from fastcache_fx.runtime import registry
from conftest import rel_err

STEPS = 4
# Inductor vs eager on these tiny fp32 models: ~1e-6 relative; a block computed wrongly or
# skipped gives > 1e-2
TOL = 1e-4
# tiny random models move their block inputs far more per step than trained ones: tau = 10
# approximates every block once warmup is over (these tests check the plumbing through the
# pipelines, not the decision rule)
APPROX = {"cache_ratio_threshold": 10.0}
CONTEXTS = {"wan": ("cond", "uncond"), "wan22": ("cond", "uncond"), "hunyuanvideo15": ("pred_cond", "pred_uncond"),
            "ltx": ("cond_uncond",), "cogvideox": ("cond_uncond",)}
FAMILIES = ("wan", "hunyuanvideo15", "ltx", "cogvideox")


@pytest.fixture(scope="module", autouse=True)
def _dynamo():
    # diffusers' hook wrapper and LoRA-scale wrapper are code objects shared by every model:
    # their cache entries count against Dynamo's recompile_limit (docs/pipelines.md, "Around the pipeline")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


class Family:
    """A family's uncompiled pipeline and a compiled one with the same weights."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames, self.sizes = zoo_video.VIDEO_SIZE[name]
        self.size = self.sizes[-1]
        self.eager, self.kwargs = zoo_video.video_pipeline(name, steps=STEPS)
        self.on = fastcache_fx.enable_fastcache(zoo_video.video_pipeline(name, steps=STEPS)[0], **APPROX)
        self._refs = {}

    def run(self, pipe, frames=None, **kw):
        return zoo_video.run_video_pipeline(pipe, self.kwargs, frames or self.frames[0], self.size, **kw)

    def run_full(self, frames=None):
        """The compiled pipeline with every block computed (approximation off)."""
        fastcache_fx.reset(self.on)
        with fastcache_fx.replay_decisions(self.on, [[False]], then="full"):
            out = self.run(self.on, frames)
        return out

    def ref(self, frames=None):
        frames = frames or self.frames[0]
        if frames not in self._refs:
            self._refs[frames] = self.run(self.eager, frames)
        return self._refs[frames]


_FAMILIES: dict[str, Family] = {}


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    torch._dynamo.reset_code_state()  # another family's sizes would make the first graph symbolic
    if request.param not in _FAMILIES:
        _FAMILIES[request.param] = Family(request.param)
    return _FAMILIES[request.param]


def trace_by_context(model, graphs: bool = False):
    """{context: [(step, approx list)]}; ``graphs``: {(context, blocks): ...}, one list per graph
    with blocks (HunyuanVideo 1.5 has two: its text refiner and, one frame per block, its stack)."""
    out = {}
    for r in fastcache_fx.stats(model)["trace"]:
        key = (r["context"], tuple(r["blocks"])) if graphs else r["context"]
        out.setdefault(key, []).append((r["step"], r["approx"]))
    return out


def test_without_approximation_equals_uncompiled(fam):
    out = fam.run_full()
    assert rel_err(out, fam.ref()) < TOL
    st = fastcache_fx.stats(fam.on)
    assert st["blocks"] and st["fallback"] == [] and st["block_approx_ratio"] == 0.0
    assert {c: v["steps"] for c, v in st["trajectory"].items()} == {c: STEPS for c in CONTEXTS[fam.name]}


def test_blocks_approximated_and_every_call_a_new_trajectory(fam):
    fastcache_fx.reset(fam.on)
    first = fam.run(fam.on)
    second = fam.run(fam.on)
    st = fastcache_fx.stats(fam.on)
    n = len(st["blocks"])
    assert n >= 2 and st["fallback"] == [] and st["block_approx_ratio"] > 0
    trace = trace_by_context(fam.on, graphs=True)
    assert {ctx for ctx, _ in trace} == set(CONTEXTS[fam.name])
    for steps in trace.values():  # per context and call: warmup (2 steps) full, then approximated
        assert [s for s, _ in steps] == [0, 1, 2, 3] * 2 and steps[:4] == steps[4:]
        assert not any(steps[0][1]) and not any(steps[1][1]) and any(steps[2][1])
    assert rel_err(second, first) < 1e-6  # nothing of the first call's cache reached the second
    assert rel_err(first, fam.ref()) > 10 * max(rel_err(fam.run_full(), fam.ref()), 1e-7)


def test_second_frame_count_keeps_the_cache(fam):
    fam.run(fam.on)
    frames = fam.frames[1]
    fastcache_fx.reset(fam.on)
    fam.run(fam.on, frames)
    st = fastcache_fx.stats(fam.on)
    live = [g for g in st["per_graph"] if g["steps"] and g["kind"] == "fastcache"]
    assert live and all(g["dynamic"] for g in live) and st["fallback"] == []
    assert all(v["block_approx_ratio"] > 0 for v in st["trajectory"].values())
    assert rel_err(fam.run_full(frames), fam.ref(frames)) < TOL  # forced full equals eager


def test_wan22_experts_keep_their_own_cache():
    """Wan 2.2: ``transformer`` (high noise) until t < boundary_ratio x 1000, then
    ``transformer_2``; enable_fastcache compiles both, each with its own state: the low-noise
    expert starts a trajectory of its own (warmup, no anchor of the other expert)."""
    torch._dynamo.reset_code_state()
    eager, kwargs = zoo_video.video_pipeline("wan22", steps=STEPS)
    pipe = fastcache_fx.enable_fastcache(zoo_video.video_pipeline("wan22", steps=STEPS)[0], **APPROX)
    assert hasattr(pipe.transformer, "_orig_mod") and hasattr(pipe.transformer_2, "_orig_mod")
    frames, sizes = zoo_video.VIDEO_SIZE["wan22"]
    out = zoo_video.run_video_pipeline(pipe, kwargs, frames[0], sizes[-1])
    high, low = trace_by_context(pipe.transformer), trace_by_context(pipe.transformer_2)
    assert set(high) == set(low) == {"cond", "uncond"}
    n_high = len(high["cond"])
    assert n_high >= 1 and n_high + len(low["cond"]) == STEPS
    for ctx in ("cond", "uncond"):  # each expert counts its own steps from 0: its own trajectory
        assert [s for s, _ in high[ctx]] == list(range(n_high))
        assert [s for s, _ in low[ctx]] == list(range(STEPS - n_high))
        assert not any(low[ctx][0][1])  # the switch computes fully
    with fastcache_fx.replay_decisions(pipe.transformer, [[False]], then="full"), \
            fastcache_fx.replay_decisions(pipe.transformer_2, [[False]], then="full"):
        forced = zoo_video.run_video_pipeline(pipe, kwargs, frames[0], sizes[-1])
    assert rel_err(forced, zoo_video.run_video_pipeline(eager, kwargs, frames[0], sizes[-1])) < TOL
    assert out.shape == forced.shape


def test_wan22_experts_target_psnr_each_its_guidance_share_and_calibration():
    """Wan 2.2 under ``target_psnr``: each expert's target reads its own guidance scale
    (``guidance_scale`` / ``guidance_scale_2``), paces only the steps it serves (the low-noise
    expert starts at the boundary step, so the two together stay within the allowed final error),
    and ``calibrate_target(pipe)`` calibrates both, each under its own setting."""
    torch._dynamo.reset_code_state()
    pipe, kwargs = zoo_video.video_pipeline("wan22", steps=STEPS)
    pipe = fastcache_fx.enable_fastcache(pipe, target_psnr=30.0)
    frames, sizes = zoo_video.VIDEO_SIZE["wan22"]

    def run():
        return zoo_video.run_video_pipeline(pipe, kwargs, frames[0], sizes[-1])

    run()
    high, low = (fastcache_fx.stats(m)["quality"] for m in (pipe.transformer, pipe.transformer_2))
    assert (high["guidance_scale"], low["guidance_scale"]) == (kwargs["guidance_scale"], kwargs["guidance_scale_2"])
    assert high["sampler_known"] and low["sampler_known"] and high["steps"] == low["steps"] == STEPS
    qh, ql = (registry.lookup(m).quality for m in (pipe.transformer, pipe.transformer_2))
    n_high = len(trace_by_context(pipe.transformer)["cond"])
    assert 1 <= n_high < STEPS and (qh.last.k0, ql.last.k0) == (0, n_high)
    assert qh.last.sq <= n_high / STEPS + 1e-6 and ql.last.sq <= (STEPS - n_high) / STEPS + 1e-6
    rec = fastcache_fx.calibrate_target(pipe, run, rounds=1)
    assert rec["generations"] == 2
    assert qh.calibrations[qh.last.key] is rec and ql.calibrations[ql.last.key] is rec
    assert qh.last.key != ql.last.key  # another guidance scale: another setting
    run()
    assert fastcache_fx.stats(pipe.transformer_2)["quality"]["calibration"] is rec
