"""Public functions: enable_fastcache, stats, reset, calibrate."""

from __future__ import annotations

import torch

from . import torch_compat
from .config import FastCacheConfig
from .runtime import registry
from .runtime.context import attach_diffusers_context
from .runtime.opaque import make_opaque_moe
from .runtime.traceable import traceable_hooks
from .runtime.stats import collect
from .runtime.uncompiled import unskip, watch_calls


def enable_fastcache(pipe_or_model, *, fullgraph: bool = False, mode: str | None = None, dynamic: bool | None = None,
                     regional: bool = False, **options):
    """Compile every denoiser of a pipeline (or a transformer) with the fastcache backend.

    The denoisers are ``pipe.transformer`` and, where present, ``pipe.transformer_2`` (Wan 2.2's
    low-noise expert): each gets its own cache state and statistics, so the switch between
    experts never reuses the other's cache. Whole-graph mode (default): each is replaced by the
    compiled module (a bare module is returned compiled); one graph with a guarded cond per block.
    ``regional=True``: every transformer block is compiled on its own, one graph per block class
    (diffusers' ``compile_repeated_blocks`` where the model defines ``_repeated_blocks``, else
    the block lists found by ``passes.blocks.block_lists``), each instance with its own cache
    state; a forward pre-hook on the transformer counts steps from its ``timestep``
    (``runtime.regional``). The module is compiled in place and returned.

    Mixture-of-experts layers that route on host values (HiDream) become one opaque op each
    (``runtime.opaque``). Classes in ``DYNAMIC_OUTPUT_SHAPE_CLASSES`` (Mochi) are traced with
    data-dependent output shapes captured, not split off by a graph break.

    Options are FastCacheConfig fields (the reference code's names: cache_ratio_threshold,
    significance_level, motion_threshold, adaptive_beta, enable_block_approx).
    ``dynamic`` goes to ``torch.compile``: None (default) lets Dynamo trace symbolic shapes from
    the second distinct shape on, so one graph serves every later resolution and batch size;
    False compiles one static graph per shape.

    A pipeline with ``enable_model_cpu_offload()`` already on gets its offload hooks removed
    before compiling and installed again on the compiled transformer (see
    ``_suspend_model_offload``), so both orders work.

    Raises:
        ValueError: a bad option value (the message names the field); ``regional=True`` with
            token selection or token merging, or on a model without recognisable blocks.
        TypeError: neither a module nor an object with ``.transformer``.
    """
    config = FastCacheConfig.from_options(options)
    names = denoiser_names(pipe_or_model)
    if not names:
        if not isinstance(pipe_or_model, torch.nn.Module):
            raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(pipe_or_model).__name__}")
        return _compile_module(pipe_or_model, config, fullgraph, mode, dynamic, regional)
    offload_device = _suspend_model_offload(pipe_or_model)
    for name in names:
        setattr(pipe_or_model, name,
                _compile_module(getattr(pipe_or_model, name), config, fullgraph, mode, dynamic, regional))
    if offload_device is not None:
        pipe_or_model.enable_model_cpu_offload(device=offload_device)
    return pipe_or_model


#: pipeline attributes that hold a denoiser (Wan 2.2: ``transformer`` for high noise,
#: ``transformer_2`` for low noise, switched at ``boundary_ratio``)
DENOISER_ATTRIBUTES = ("transformer", "transformer_2")


def denoiser_names(pipe) -> list[str]:
    """The attributes of ``pipe`` (not an nn.Module) that hold a transformer module, in
    ``DENOISER_ATTRIBUTES`` order; empty for a module or an object without one."""
    if isinstance(pipe, torch.nn.Module):
        return []
    return [n for n in DENOISER_ATTRIBUTES if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _compile_module(target: torch.nn.Module, config: FastCacheConfig, fullgraph: bool, mode, dynamic, regional: bool):
    """One denoiser compiled (whole graph) or its blocks compiled in place (regional); each model
    its own registry entry, so its own cache state and statistics."""
    module = registry.unwrap(target)
    entry = registry.entry_for_params(module.parameters())
    attach_diffusers_context(module, on_reset=entry.drop_state)
    backend = _backend_for(config, mode)
    make_opaque_moe(module)  # HiDream: its MoE routing would break the graph inside every block
    traceable_hooks(module)  # context parallelism's hooks on a block (Wan) would break the block loop
    if regional:
        _compile_regional(module, backend, fullgraph=fullgraph, dynamic=dynamic)
        return module
    compiled = torch.compile(module, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    unskip(module)
    forward = compiled.forward
    if type(module).__name__ in DYNAMIC_OUTPUT_SHAPE_CLASSES:
        forward = torch_compat.dynamo_config_patch(capture_dynamic_output_shape_ops=True)(forward)
    compiled.forward = watch_calls(forward, entry, module)
    return compiled


#: classes ``enable_fastcache`` traces with ``capture_dynamic_output_shape_ops`` (direct
#: ``torch.compile`` users set it themselves, docs/pipelines.md "Around the pipeline"): Mochi's text
#: mask selects tokens by value (``nonzero``), a data-dependent shape; without it Dynamo breaks the
#: graph inside every block. Not for every class: HunyuanVideo 1.5's graph, traced with it, hides
#: its main blocks from the block search (unbacked sizes)
DYNAMIC_OUTPUT_SHAPE_CLASSES = frozenset({"MochiTransformer3DModel"})


_BACKENDS: dict = {}


def _backend_for(config: FastCacheConfig, mode: str | None):
    """One backend object per (config, mode): Dynamo then reuses a compiled graph for every model
    of a class (each model keeps its own state, ``runtime.state.SharedGraph``) instead of
    recompiling per model until its recompile limit (8) leaves later models uncompiled. Token
    selection binds its variants to one model: a backend of its own."""
    from .backend import FastCacheBackend

    if config.enable_spatial_approx:
        return FastCacheBackend(config, mode=mode)
    key = (config, mode)
    if key not in _BACKENDS:
        _BACKENDS[key] = FastCacheBackend(config, mode=mode)
    return _BACKENDS[key]


def _suspend_model_offload(pipe):
    """Remove diffusers' model CPU offload hooks from ``pipe``; returns their device, or None
    when offload is off.

    Why: accelerate stores the hooked module's ``_old_forward`` on the module, and a compiled
    module forwards attribute reads to the module it wraps; at the end of every call
    ``maybe_free_model_hooks`` removes and re-adds the hooks on ``pipe.transformer`` (the
    compiled module) and thereby sets its ``forward`` to the uncompiled one: from the second
    call on the pipeline would run eager, silently. Hooks added after compiling live on the
    compiled module and survive that cycle.
    """
    if not getattr(pipe, "_all_hooks", None) or getattr(pipe, "_offload_device", None) is None:
        return None
    device = pipe._offload_device
    pipe.remove_all_hooks()
    return device


def _compile_regional(module: torch.nn.Module, backend, **compile_kw) -> None:
    """Regional compilation of ``module``'s blocks with ``backend`` (see ``enable_fastcache``)."""
    from .passes.blocks import block_lists
    from .runtime.regional import RegionalModel, install_step_hook

    from .compat import Target, check

    config = check(backend.config, Target(block_graph=True))
    repeated = set(getattr(module, "_repeated_blocks", None) or ())
    if repeated:
        blocks = {n: m for n, m in module.named_modules() if type(m).__name__ in repeated}
    else:
        blocks = {f"{lst}.{i}": m for lst, ml in block_lists(module) for i, m in enumerate(ml)}
    if not blocks:
        raise ValueError(f"regional: no transformer blocks found in {type(module).__name__} (no _repeated_blocks and "
                         "no ModuleList of identical blocks)")
    entry = registry.entry_for_params(module.parameters())
    if entry.regional is None:
        entry.regional = RegionalModel(entry, config.trace_steps)
    entry.regional.register_blocks(blocks)
    install_step_hook(module, entry.regional)
    if repeated:
        module.compile_repeated_blocks(backend=backend, **compile_kw)
    else:
        for m in blocks.values():
            m.compile(backend=backend, **compile_kw)


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
    ``fastcache_fx.calibration.calibrate``)."""
    from .calibration import calibrate as _calibrate

    return _calibrate(model, run_fn, out=out, **kwargs)
