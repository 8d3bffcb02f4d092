"""Many models in one process, as a server or a notebook comparing methods holds them: each keeps
its cache whatever was compiled before it, and a model Dynamo runs uncompiled says so in
``stats()`` with the reason instead of reporting zeros."""

import copy

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from conftest import rel_err


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _trajectory(model, kw, steps=4):
    outs = []
    for k in range(steps):
        t = torch.full_like(kw["timestep"], 900 - 200 * k)
        outs.append(model(**dict(kw, timestep=t, hidden_states=kw["hidden_states"] * (1 - 0.02 * k))).sample)
    return outs


def test_cached_after_first_block_cache_copies():
    """A plain compile, then two copies with diffusers' FirstBlockCache compiled (Dynamo fails
    to trace their hooks inside the block loop and marks the class's forward to run eagerly),
    then enable_fastcache on a fresh copy: it gets the cache all the same."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.models.cache_utils import CacheMixin

    model, kw = zoo.build("dit", batch=1)
    torch.compile(copy.deepcopy(model))(**kw)
    for _ in range(2):
        m = copy.deepcopy(model)
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=0.05))
        with CacheMixin.cache_context(m, "cond"):  # DiT lacks CacheMixin: the context set as it does
            torch.compile(m)(**kw)
    fresh = copy.deepcopy(model)
    ref = _trajectory(fresh, kw)
    compiled = fastcache_fx.enable_fastcache(fresh, cache_ratio_threshold=10.0)
    out = _trajectory(compiled, kw)
    st = fastcache_fx.stats(compiled)
    assert st["blocks"] == ["transformer_blocks.0", "transformer_blocks.1"]
    assert st["fallback"] == [] and st["uncompiled_calls"] == 0 and st["block_approx_ratio"] > 0
    assert rel_err(out[0], ref[0]) < 1e-4  # the first step computes every block


def test_uncompiled_calls_reported_with_the_reason():
    """Two models of one class with different option sets: two backend objects, so the second
    model recompiles the shared forward; at recompile_limit=1 Dynamo runs it eagerly and its
    stats() say so (Dynamo's message as the reason), not zeros."""
    a, kw = zoo.build("dit", batch=1)
    b = copy.deepcopy(a)
    ca = fastcache_fx.enable_fastcache(a, cache_ratio_threshold=10.0)
    cb = fastcache_fx.enable_fastcache(b, cache_ratio_threshold=0.5)
    with torch._dynamo.config.patch(recompile_limit=1):
        ca(**kw)
        ref = b(**kw).sample
        out = cb(**kw).sample
        cb(**kw)
    sa, sb = fastcache_fx.stats(ca), fastcache_fx.stats(cb)
    assert sa["uncompiled_calls"] == 0 and sa["steps"] == 1 and sa["fallback"] == []
    assert sb["uncompiled_calls"] == 2 and sb["steps"] == 0
    assert len(sb["fallback"]) == 1 and "ran uncompiled (2 calls)" in sb["fallback"][0]
    assert "recompile_limit" in sb["fallback"][0]
    assert rel_err(out, ref) < 1e-6  # eager, so exact
    fastcache_fx.reset(cb)
    assert fastcache_fx.stats(cb)["uncompiled_calls"] == 0
