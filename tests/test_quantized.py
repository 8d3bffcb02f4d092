"""Quantized weights (torchao): the int8 weight-only DiT is cached through a bare
``torch.compile(backend="fastcache")``, equals the quantized model under plain Inductor with the
approximation off, and never fails the compile (a rewrite that cannot be built falls back to
plain Inductor with the reason in stats())."""

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo

from conftest import rel_err

torchao = pytest.importorskip("torchao")


def _int8_dit():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, kw = zoo.build("dit")
    quantize_(model, Int8WeightOnlyConfig())
    return model, kw


def _run(compiled, kw, ts):
    x, labels = kw["hidden_states"], kw["class_labels"]
    with torch.no_grad():
        return [compiled(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample for t in ts]


@pytest.mark.slow
def test_int8_weight_only_dit_is_cached_and_equals_inductor():
    torch._dynamo.reset()
    model, kw = _int8_dit()
    ts = (900, 800, 700, 600, 500, 400)
    ref = _run(torch.compile(model), kw, ts)  # the quantized model under plain Inductor
    torch._dynamo.reset()
    off = torch.compile(model, backend="fastcache", options={"enable_block_approx": False})
    _run(off, kw, ts[:1])  # the first call prepares the model (its weights unwrapped), the next traces again
    fastcache_fx.reset(off)
    outs = _run(off, kw, ts)
    st = fastcache_fx.stats(off)
    assert st["fallback"] == [] and st["per_graph"][-1]["kind"] == "fastcache", st["per_graph"]
    for a, b in zip(outs, ref):
        assert rel_err(a, b) < 1e-4
    torch._dynamo.reset()
    live = torch.compile(model, backend="fastcache")
    _run(live, kw, ts[:1])
    fastcache_fx.reset(live)
    outs = _run(live, kw, ts)
    st = fastcache_fx.stats(live)
    assert st["fallback"] == [] and st["block_approx_ratio"] > 0, st
    assert all(torch.isfinite(o).all() for o in outs)


def test_a_failing_rewrite_falls_back_with_its_reason(monkeypatch):
    """The safety net: an exception inside the rewrite compiles plain Inductor, one warning, the
    reason in stats(); the output equals the eager model."""
    import warnings

    from fastcache_fx import backend

    def broken(*args, **kwargs):
        raise RuntimeError("no rule for this graph")

    monkeypatch.setattr(backend, "apply_block_cache", broken)
    torch._dynamo.reset()
    model, kw = zoo.build("dit")
    compiled = torch.compile(model, backend="fastcache")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = _run(compiled, kw, (900, 800))
    st = fastcache_fx.stats(compiled)
    assert len(st["fallback"]) == 1 and "rewrite of this graph failed (RuntimeError: no rule" in st["fallback"][0]
    assert sum("rewrite of this graph failed" in str(w.message) for w in caught) == 1
    ref = _run(model, kw, (800,))[0]
    assert rel_err(outs[1], ref) < 1e-4
