"""Serving: concurrent requests on one compiled transformer never share cache state, and a
finished request's state is freed (docs/serving.md, ``runtime.requests``, ``runtime.live``).

Compile budget: one tiny DiT pipeline compiled once for the module (``served``); its transformer
is called bare (as a server without a pipeline would) and through ``DiTPipeline.from_pipe``
pipelines (diffusers' server pattern). tau = 10 approximates every block after warm-up, so a
request whose state another request touched computes something else than alone.
"""

import asyncio
import concurrent.futures
import copy
import threading

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from conftest import rel_err

STEPS = 4
SIZE = 16
TIMESTEPS = (900, 700, 500, 300)
OPTIONS = {"cache_ratio_threshold": 10.0, "max_live_requests": 2}


@pytest.fixture(scope="module")
def served():
    """(pipeline after enable_fastcache, its call kwargs, the transformer's bare-call kwargs)."""
    torch._dynamo.reset()
    pipe, kw = zoo.pipeline("dit", steps=STEPS)
    fastcache_fx.enable_fastcache(pipe, **OPTIONS)
    zoo.run_pipeline(pipe, kw, SIZE)  # compiles (the bare calls below use the pipeline's shapes)
    c = pipe.transformer.config
    s = SIZE // 2
    bare = {"hidden_states": torch.randn(2, c.in_channels, s, s), "class_labels": torch.tensor([1, 1000])}
    yield pipe, kw, bare
    torch._dynamo.reset()


def trajectory(transformer, bare: dict, seed: int, barrier=None) -> torch.Tensor:
    """STEPS bare calls at decreasing timesteps, each input moved by the last output (a sampler's
    dependence on the state); ``barrier`` makes concurrent callers take their steps in lockstep."""
    x = bare["hidden_states"] + torch.randn(bare["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    for t in TIMESTEPS:
        if barrier is not None:
            barrier.wait()
        out = transformer(x, timestep=torch.full((2,), t), class_labels=bare["class_labels"]).sample
        x = x - 0.1 * out[:, :x.shape[1]]
    return x


def alone(transformer, bare, seeds) -> list[torch.Tensor]:
    """Each seed's trajectory as one request of its own, one after the other."""
    outs = []
    for s in seeds:
        with fastcache_fx.request():
            outs.append(trajectory(transformer, bare, s))
    return outs


def per_request(cls, pipe):
    """diffusers' server pattern: a pipeline per request around the shared compiled transformer,
    with its own scheduler (schedulers keep per-call state)."""
    return cls.from_pipe(pipe, scheduler=copy.deepcopy(pipe.scheduler))


def in_threads(fn, n: int) -> list:
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = fn(i)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


def test_two_threads_without_context_equal_alone(served):
    pipe, _, bare = served
    fastcache_fx.reset(pipe)
    want = alone(pipe.transformer, bare, (0, 1))
    st = fastcache_fx.stats(pipe)
    assert st["block_approx_ratio"] > 0  # alone, steps are approximated: sharing state would change them
    assert st["live_requests"] == 0 and st["state_bytes"] == 0  # request() freed both
    barrier = threading.Barrier(2)
    got = in_threads(lambda i: trajectory(pipe.transformer, bare, i, barrier), 2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6
    st = fastcache_fx.stats(pipe)
    mine = [st["requests"][r] for r in st["requests"] if r.startswith("thread-")]
    assert len(mine) == 2 and all(r["calls"] == STEPS and r["block_approx_ratio"] > 0 for r in mine)
    # the threads ended: their requests are freed at the next call or stats()
    assert st["live_requests"] == 0 and st["state_bytes"] == 0


def test_pipelines_from_pipe_in_threads_equal_alone_and_free_their_state(served):
    from diffusers import DiTPipeline

    pipe, kw, _ = served
    fastcache_fx.reset(pipe)
    want = [zoo.run_pipeline(pipe, kw, SIZE, seed=s) for s in (0, 1)]
    st = fastcache_fx.stats(pipe)
    # each pipeline call is a request, freed when the call ended
    assert len(st["requests"]) == 2 and st["live_requests"] == 0 and st["state_bytes"] == 0
    assert st["last_request"]["state_bytes"] > 0 and not st["last_request"]["live"]
    # a pipeline per request around the shared compiled transformer
    got = in_threads(lambda i: zoo.run_pipeline(per_request(DiTPipeline, pipe), kw, SIZE, seed=i), 2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6
    st = fastcache_fx.stats(pipe)
    assert len(st["requests"]) == 4 and st["live_requests"] == 0 and st["state_bytes"] == 0


def test_asyncio_run_in_executor_is_isolated(served):
    pipe, _, bare = served
    fastcache_fx.reset(pipe)
    want = alone(pipe.transformer, bare, (2, 3))
    barrier = threading.Barrier(2)

    async def serve():
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            return await asyncio.gather(*(loop.run_in_executor(pool, trajectory, pipe.transformer, bare, s, barrier)
                                          for s in (2, 3)))

    got = asyncio.run(serve())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6


def test_requests_leave_only_in_flight_state(served):
    """200 short requests from a pool of 2 threads: scoped ones free everything, unscoped ones
    keep at most one state per thread (the requests that could still be in flight)."""
    pipe, _, bare = served
    fastcache_fx.reset(pipe)
    t = pipe.transformer

    def one(i):
        with fastcache_fx.request():
            t(bare["hidden_states"], timestep=torch.full((2,), 900), class_labels=bare["class_labels"])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(200)))
    st = fastcache_fx.stats(pipe)
    assert st["steps"] == 200 and st["live_requests"] == 0 and st["state_bytes"] == 0
    assert len(st["requests"]) == 64  # the trace keeps the last trace_requests requests

    def unscoped(i):
        t(bare["hidden_states"], timestep=torch.full((2,), 900 - i), class_labels=bare["class_labels"])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(unscoped, range(20)))
        st = fastcache_fx.stats(pipe)
        assert 1 <= st["live_requests"] <= 2 and st["state_bytes"] > 0  # one per pool thread that ran
    assert fastcache_fx.stats(pipe)["state_bytes"] == 0  # the pool's threads ended


def test_bound_on_live_requests_drops_the_least_recent_which_recomputes(served):
    """Three asyncio tasks step one transformer in turns (each task is a request) with room for
    two: each step finds its own state dropped by the two others, so it starts afresh and is
    computed fully (and its trace record says so), giving the uncached result."""
    pipe, _, bare = served
    fastcache_fx.reset(pipe)
    t = pipe.transformer
    with fastcache_fx.replay_decisions(pipe, [[False]], then="full"):
        full = alone(t, bare, (4, 5, 6))
    fastcache_fx.reset(pipe)

    async def one(seed):
        x = bare["hidden_states"] + torch.randn(bare["hidden_states"].shape,
                                                generator=torch.Generator().manual_seed(seed))
        for ts in TIMESTEPS:
            out = t(x, timestep=torch.full((2,), ts), class_labels=bare["class_labels"]).sample
            x = x - 0.1 * out[:, :x.shape[1]]
            await asyncio.sleep(0)  # the next task's turn
        return x

    async def main():
        return await asyncio.gather(*(one(s) for s in (4, 5, 6)))

    got = asyncio.run(main())
    for g, w in zip(got, full):
        assert rel_err(g, w) < 1e-6
    st = fastcache_fx.stats(pipe)
    assert st["live_requests"] == 0 and st["evictions"] >= 3 * (len(TIMESTEPS) - 1)
    assert all(not any(r["approx"]) and r["step"] == 0 for r in st["trace"])  # every step started afresh
    # each request's first step found no state; every later one found it dropped
    assert sum(r["evicted"] for r in st["trace"]) == 3 * (len(TIMESTEPS) - 1)
    assert all(r["evicted"] == len(TIMESTEPS) - 1 for r in st["requests"].values())


def test_request_scope_rejects_a_bad_name():
    with pytest.raises(ValueError, match="name"):
        with fastcache_fx.request(""):
            pass


@pytest.mark.parametrize("name,value", [("max_live_requests", 0), ("trace_requests", 0), ("max_live_requests", 1.5)])
def test_bounds_are_validated(name, value):
    with pytest.raises(ValueError, match=name):
        fastcache_fx.FastCacheConfig(**{name: value})


@pytest.mark.slow
def test_flux_cond_uncond_from_pipe_threads_equal_alone():
    """FluxPipeline (true CFG: "cond" / "uncond" contexts, the same names in every request) with
    two requests at once on one compiled transformer: each as alone, each with its two contexts."""
    from diffusers import FluxPipeline

    torch._dynamo.reset()
    pipe, kw = zoo.pipeline("flux", num_layers=1, steps=STEPS)
    fastcache_fx.enable_fastcache(pipe, cache_ratio_threshold=10.0)
    want = [zoo.run_pipeline(pipe, kw, SIZE, seed=s) for s in (0, 1)]
    assert fastcache_fx.stats(pipe)["block_approx_ratio"] > 0
    fastcache_fx.reset(pipe)
    got = in_threads(lambda i: zoo.run_pipeline(per_request(FluxPipeline, pipe), kw, SIZE, seed=i), 2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6
    st = fastcache_fx.stats(pipe)
    assert len(st["requests"]) == 2 and st["live_requests"] == 0 and st["state_bytes"] == 0
    for r in st["requests"].values():
        assert r["contexts"] == ["cond", "uncond"] and r["calls"] == 2 * STEPS and r["state_bytes"] > 0
    torch._dynamo.reset()


@pytest.mark.slow
def test_regional_two_threads_equal_alone():
    """Regional compilation (one graph per block class, the step clock in the runtime): two
    threads stepping one model at once, each as alone."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    fastcache_fx.enable_fastcache(model, regional=True, cache_ratio_threshold=10.0)
    bare = {"hidden_states": kw["hidden_states"], "class_labels": kw["class_labels"]}
    b = bare["hidden_states"].shape[0]

    def traj(seed, barrier=None):
        x = bare["hidden_states"] + torch.randn(bare["hidden_states"].shape,
                                                generator=torch.Generator().manual_seed(seed))
        for t in TIMESTEPS:
            if barrier is not None:
                barrier.wait()
            x = x - 0.1 * model(x, timestep=torch.full((b,), t), class_labels=bare["class_labels"]).sample[:, :x.shape[1]]
        return x

    want = []
    for s in (0, 1):
        with fastcache_fx.request():
            want.append(traj(s))
    assert fastcache_fx.stats(model)["block_approx_ratio"] > 0
    barrier = threading.Barrier(2)
    got = in_threads(lambda i: traj(i, barrier), 2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6
    st = fastcache_fx.stats(model)
    assert st["live_requests"] == 0 and st["state_bytes"] == 0
    torch._dynamo.reset()
