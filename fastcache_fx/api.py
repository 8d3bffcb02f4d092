"""Public functions: enable_fastcache, disable_fastcache, set_sampler, set_target_psnr, calibrate_target, stats,
reset, calibrate."""

from __future__ import annotations

import weakref

import torch

from . import torch_compat
from .config import FastCacheConfig
from .runtime import registry
from .runtime.context import attach_diffusers_context, detach_diffusers_context
from .runtime.requests import end_current_request
from .runtime.opaque import restore_moe
from .runtime.stats import Stats, collect
from .runtime.prepare import DYNAMIC_OUTPUT_SHAPE_CLASSES, dynamic_output_shapes, mark_prepared, prepare  # noqa: F401
from .runtime.uncompiled import unskip, watch_calls


def enable_fastcache(pipe_or_model, *, config: FastCacheConfig | dict | None = None, fullgraph: bool = False,
                     mode: str | None = None, dynamic: bool | None = None, regional: bool = False, **options):
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

    ``config``: a ``FastCacheConfig`` (the object ``FastCacheBackend`` and ``export`` take) or a
    dict of its options; ``options``: FastCacheConfig keywords (flat names, ``preset``, group
    objects), applied on top of ``config``. ``disable_fastcache`` undoes the call.

    ``target_psnr`` (whole-graph mode): the target is met on the final sample, not through a
    fixed budget: the final sample's sensitivity to each step's output, read off the pipeline's
    scheduler, the guidance scale and how CFG is called weigh the output budget step by step
    (``runtime.quality``; docs/quality.md). A bare module learns its sampler from ``set_sampler``
    and until then uses the fixed relation ``config.budget_for_psnr``. Every target shares one
    compiled graph.

    ``dynamic`` goes to ``torch.compile``: None (default) lets Dynamo trace symbolic shapes from
    the second distinct shape on, so one graph serves every later resolution and batch size;
    False compiles one static graph per shape.

    A pipeline with ``enable_model_cpu_offload()`` already on gets its offload hooks removed
    before compiling and installed again on the compiled transformer (see
    ``_suspend_model_offload``), so both orders work.

    Raises:
        ValueError: a bad option value (the message names the field), two options of which one
            makes the other meaningless (both named); ``regional=True`` with
            token selection or token merging, or on a model without recognisable blocks.
        TypeError: neither a module nor an object with ``.transformer``.
    """
    config = FastCacheConfig.from_options(config, **options)
    target = _sampler_target(config, regional)
    if target is not None:  # one graph serves every target: the target enters as per-step controls
        config = config.replace(target_psnr=None)
    names = denoiser_names(pipe_or_model)
    if not names:
        if not isinstance(pipe_or_model, torch.nn.Module):
            raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(pipe_or_model).__name__}")
        return _compile_module(pipe_or_model, config, fullgraph, mode, dynamic, regional, target)
    offload_device = _suspend_model_offload(pipe_or_model)
    for name in names:
        setattr(pipe_or_model, name, _compile_module(getattr(pipe_or_model, name), config, fullgraph, mode, dynamic,
                                                     regional, target, pipe=pipe_or_model, denoiser=name))
    if offload_device is not None:
        pipe_or_model.enable_model_cpu_offload(device=offload_device)
    return pipe_or_model


def disable_fastcache(pipe_or_model):
    """Undo ``enable_fastcache``: every denoiser of the pipeline gets its uncompiled module back
    (a compiled module given alone: that module is returned), with the cache state, statistics
    and what ``enable_fastcache`` added removed (the regional step hook and compiled blocks, the
    CFG-context hook, the opaque MoE forwards); model CPU offload, if on, is moved to the
    restored module. The restored module computes exactly what it computed before compiling.
    (Dynamo keeps the compiled code it cached; ``torch._dynamo.reset()`` drops it.)

    Returns:
        the pipeline, or the uncompiled module.

    Raises:
        TypeError: neither a module nor an object with ``.transformer``.
    """
    names = denoiser_names(pipe_or_model)
    if not names:
        if not isinstance(pipe_or_model, torch.nn.Module):
            raise TypeError(f"expected a diffusers pipeline or an nn.Module, got {type(pipe_or_model).__name__}")
        return _restore_module(pipe_or_model)
    offload_device = _suspend_model_offload(pipe_or_model)
    for name in names:
        setattr(pipe_or_model, name, _restore_module(getattr(pipe_or_model, name)))
    if offload_device is not None:
        pipe_or_model.enable_model_cpu_offload(device=offload_device)
    return pipe_or_model


def _restore_module(target: torch.nn.Module) -> torch.nn.Module:
    """The module behind ``target`` with what ``_compile_module`` added removed."""
    module = registry.unwrap(target)
    for m in module.modules():  # regional: blocks compiled in place (nn.Module.compile)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    handle = module.__dict__.pop("_fastcache_step_hook", None)
    if handle is not None:
        handle.remove()
    module.__dict__.pop("_reset_stateful_cache", None)  # end_request_with_pipeline_call's hook
    restore_moe(module)
    detach_diffusers_context(module)
    registry.forget(module)
    return module


#: pipeline attributes that hold a denoiser (Wan 2.2: ``transformer`` for high noise,
#: ``transformer_2`` for low noise, switched at ``boundary_ratio``)
DENOISER_ATTRIBUTES = ("transformer", "transformer_2")


def denoiser_names(pipe) -> list[str]:
    """The attributes of ``pipe`` (not an nn.Module) that hold a transformer module, in
    ``DENOISER_ATTRIBUTES`` order; empty for a module or an object without one."""
    if isinstance(pipe, torch.nn.Module):
        return []
    return [n for n in DENOISER_ATTRIBUTES if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def _sampler_target(config: FastCacheConfig, regional: bool) -> float | None:
    """The ``target_psnr`` that ``runtime.quality`` meets per step (None: none, regional mode,
    or a target the config already turned into computing fully)."""
    if config.target_psnr is None or regional or not config.enable_block_approx:
        return None
    from .config import budget_for_psnr

    return float(config.target_psnr) if budget_for_psnr(float(config.target_psnr)) is not None else None


def _compile_module(target: torch.nn.Module, config: FastCacheConfig, fullgraph: bool, mode, dynamic, regional: bool,
                    target_psnr: float | None = None, pipe=None, denoiser: str = "transformer"):
    """One denoiser compiled (whole graph) or its blocks compiled in place (regional); each model
    its own registry entry, so its own cache state and statistics. ``target_psnr``: the model's
    ``runtime.quality.QualityTarget`` (its sampler from ``pipe``'s scheduler when given; ``denoiser``:
    the pipeline attribute that holds the model)."""
    module = registry.unwrap(target)
    entry = registry.entry_for_params(module.parameters())
    end_request_with_pipeline_call(module)
    backend = _backend_for(config, mode)
    # HiDream: its MoE routing would break the graph inside every block; context parallelism's hooks
    # on a block (Wan) would break the block loop
    prepare(module)
    registry.entry_for_params(module.parameters(), default=entry)  # unwrapped parameters' plain tensors
    entry.module = weakref.ref(module)  # block graphs Dynamo splits off (graph breaks) take the model's block names
    if regional:
        _compile_regional(module, backend, fullgraph=fullgraph, dynamic=dynamic)
        return module
    compiled = torch.compile(module, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    unskip(module)
    mark_prepared(compiled)
    forward = compiled.forward
    if type(module).__name__ in DYNAMIC_OUTPUT_SHAPE_CLASSES:
        forward = dynamic_output_shapes(forward)
    compiled.forward = watch_calls(forward, entry, module)
    if target_psnr is not None:
        from .runtime.quality import QualityTarget, quality_forward

        entry.quality = QualityTarget(target_psnr, config.error_budget, pipe=pipe, denoiser=denoiser)
        compiled.forward = quality_forward(compiled.forward, entry)
    return compiled


def end_request_with_pipeline_call(module: torch.nn.Module) -> None:
    """Free a request's cache state when the diffusers pipeline call that runs ``module`` ends.

    Every diffusers pipeline ends its ``__call__`` with ``maybe_free_model_hooks()``, which calls
    ``component._reset_stateful_cache()`` on each component that has it (a compiled module
    forwards the lookup to the module it wraps). Models with diffusers' CacheMixin have it: it
    resets their stateful hooks, among them ours (``runtime.context.attach_diffusers_context``),
    which ends the calling thread's request (``runtime.requests.end_current_request``). Models
    without CacheMixin (DiT, PixArt) get an instance attribute of that name that does the same.
    Other requests, running concurrently, keep their state. Idempotent."""
    if attach_diffusers_context(module, on_reset=end_current_request):
        return
    if "_reset_stateful_cache" not in module.__dict__:
        module.__dict__["_reset_stateful_cache"] = _end_request_hook


def _end_request_hook(*_args, **_kwargs) -> None:
    end_current_request()


def set_target_psnr(pipe_or_model, target_psnr: float, *, sampler_aware: bool = True) -> None:
    """Change the ``target_psnr`` of a pipeline or model that ``enable_fastcache`` compiled with
    one (whole-graph), without recompiling: the target is a per-step control of the graph.
    ``sampler_aware=False`` uses the fixed relation ``config.budget_for_psnr`` as a bare backend
    does (for comparisons).

    Raises:
        ValueError: the model was not compiled with a ``target_psnr``, or a target outside
            0 < target <= ``config.MAX_TARGET_PSNR``.
    """
    from .runtime.quality import QualityTarget

    pipe = pipe_or_model if denoiser_names(pipe_or_model) else None
    for entry in _quality_entries(pipe_or_model):
        q = entry.quality
        entry.quality = QualityTarget(target_psnr, q.budget, pipe=pipe, aware=sampler_aware, denoiser=q.denoiser)


def _quality_entries(pipe_or_model) -> list:
    """The registry entries of a pipeline's denoisers (or of a model) with a target; raises
    ValueError when one has none."""
    names = denoiser_names(pipe_or_model)
    entries = [registry.lookup(getattr(pipe_or_model, n)) for n in names] if names else [registry.lookup(pipe_or_model)]
    if any(e is None or e.quality is None for e in entries):
        raise ValueError("target_psnr: the model was not compiled by enable_fastcache(..., target_psnr=...)")
    return entries


def calibrate_target(pipe_or_model, run, *, rounds: int = 3) -> dict:
    """Calibrate ``target_psnr`` for one setting (scheduler and its timesteps, guidance scale,
    input shape) of a model compiled by ``enable_fastcache(..., target_psnr=...)``: ``run()``
    generates once with that setting and the same noise every call (fixed generator / latents)
    and returns the final sample. It runs 1 generation computing every block and up to
    ``rounds`` cached ones (``runtime.quality.calibrate``); later generations of the same setting
    use the factor found, another setting is calibrated anew (or uses the uncalibrated
    sampler-aware weight). A pipeline's denoisers (Wan 2.2's two experts) are calibrated together,
    each keeping the record under its own setting (its guidance scale). Returns the record (scale,
    PSNR per round, generations, seconds), which ``stats()["quality"]["calibration"]`` also shows
    for each call that used it.

    Raises:
        ValueError: the model was not compiled with a ``target_psnr``.
    """
    from .runtime.quality import calibrate

    return calibrate([e.quality for e in _quality_entries(pipe_or_model)], run, rounds=rounds)


def set_sampler(model, scheduler, guidance_scale: float = 1.0) -> bool:
    """Tell a model compiled by ``enable_fastcache(model, target_psnr=...)`` the sampler of the
    next generation (custom sampling loops; pipelines need not call it): ``scheduler`` after
    ``set_timesteps``, before its first step, and the CFG scale. Returns False (and does nothing)
    for a model without a target. Raises ValueError for a scheduler without timesteps."""
    try:
        entry = registry.lookup(model)
    except TypeError:  # not a module (a wrapper or function around one): nothing compiled to tell
        return False
    if entry is None or entry.quality is None:
        return False
    entry.quality.bind(scheduler, guidance_scale)
    return True


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
        entry.regional = RegionalModel(entry, config)
    entry.regional.register_blocks(blocks)
    install_step_hook(module, entry.regional)
    if repeated:
        module.compile_repeated_blocks(backend=backend, **compile_kw)
    else:
        for m in blocks.values():
            m.compile(backend=backend, **compile_kw)


def stats(model) -> Stats:
    """Decisions of every fastcache graph compiled for ``model`` (module, compiled module or
    pipeline) since its last ``reset()``: a ``Stats`` (``fastcache_fx.runtime.stats.Stats``
    documents the fields; ``st.block_approx_ratio`` or, as a mapping, ``st["block_approx_ratio"]``)."""
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
