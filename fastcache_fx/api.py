"""Public functions: enable_fastcache, stats, reset, calibrate."""

from __future__ import annotations

import torch

from .config import FastCacheConfig
from .runtime import registry
from .runtime.context import attach_diffusers_context
from .runtime.stats import collect


def enable_fastcache(pipe_or_model, *, fullgraph: bool = False, mode: str | None = None, **options):
    """Compile a pipeline's transformer (or a transformer) with the fastcache backend.

    ``pipe.transformer`` is replaced by the compiled module; a bare module is returned compiled.
    Options are FastCacheConfig fields (the reference code's names: cache_ratio_threshold,
    significance_level, motion_threshold, adaptive_beta, enable_block_approx).

    Raises:
        ValueError: a bad option value (the message names the field).
        TypeError: neither a module nor an object with ``.transformer``.
    """
    from .backend import FastCacheBackend

    config = FastCacheConfig.from_options(options)
    target = pipe_or_model.transformer if hasattr(pipe_or_model, "transformer") else pipe_or_model
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(pipe_or_model).__name__}")
    attach_diffusers_context(registry.unwrap(target))
    compiled = torch.compile(registry.unwrap(target), backend=FastCacheBackend(config, mode=mode), fullgraph=fullgraph,
                             dynamic=False)
    if hasattr(pipe_or_model, "transformer"):
        pipe_or_model.transformer = compiled
        return pipe_or_model
    return compiled


def stats(model) -> dict:
    """Decisions of every fastcache graph compiled for ``model`` (module, compiled module or
    pipeline): see ``fastcache_fx.runtime.stats.collect`` for the fields."""
    return collect(registry.lookup(model))


def reset(model) -> None:
    """Forget the cache of ``model``: its next step computes every block fully."""
    entry = registry.lookup(model)
    if entry is not None:
        entry.reset()


def calibrate(model, run_fn, out: str | None = None, **kwargs):
    """Fit the linear block maps by ridge regression on the uncompiled model (see
    ``fastcache_fx.runtime.calibration.calibrate``)."""
    from .runtime.calibration import calibrate as _calibrate

    return _calibrate(model, run_fn, out=out, **kwargs)
