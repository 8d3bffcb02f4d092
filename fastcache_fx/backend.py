"""The ``fastcache`` Dynamo backend: find blocks, rewrite them into guarded conds, lower once.

    torch.compile(transformer, backend="fastcache", options={"cache_ratio_threshold": 0.05})

``backend="fastcache"`` resolves through the ``torch_dynamo_backends`` entry point to
``fastcache_backend``; ``FastCacheBackend(config)`` is the same thing as a callable object.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import fx

from .config import FastCacheConfig
from .lowering.inductor import compile_graph
from .passes.block_cache import AccumSpec, ControlSpec, StateSpec, apply_block_cache
from .passes.blocks import find_blocks, is_param, node_value
from .passes.token_merge import apply_token_merge, attach_token_merge_state
from .runtime import registry
from .runtime.state import GraphRuntime

log = logging.getLogger("fastcache_fx")


class FastCacheBackend:
    """A Dynamo backend object: ``torch.compile(model, backend=FastCacheBackend(config))``.

    Args:
        config: a FastCacheConfig (or None for defaults); ``**options`` override its fields.
        mode: a torch.compile mode passed to Inductor.

    Raises:
        ValueError: a bad option (named in the message).
    """

    def __init__(self, config: FastCacheConfig | None = None, mode: str | None = None, **options) -> None:
        self.config = FastCacheConfig.from_options(config, **options)
        self.mode = mode

    def __call__(self, gm: fx.GraphModule, example_inputs: list, *, select=None, **kwargs):
        config = self.config
        if kwargs.get("options"):
            config = FastCacheConfig.from_options(config, **kwargs["options"])
        mode = kwargs.get("mode") or self.mode
        search = find_blocks(gm)
        if not search.regions:
            warnings.warn("fastcache: no transformer blocks recognised in this graph; compiled with plain Inductor"
                          + (f" (left alone: {search.left_alone})" if search.left_alone else ""), stacklevel=2)
            return compile_graph(gm, example_inputs, mode)
        if _has_symbolic_shapes(gm):
            # a dynamic-shape graph: cache state could not be sized safely, so no cache at all
            # (correct outputs, never a stale cache); torch.compile(..., dynamic=False) avoids this
            warnings.warn("fastcache: graph has dynamic shapes; compiled with plain Inductor and no cache. "
                          "Pass dynamic=False to torch.compile (enable_fastcache does) to keep one cached graph "
                          "per shape", stacklevel=2)
            return compile_graph(gm, example_inputs, mode)
        if config.lowering == "tensorrt":
            from .lowering.tensorrt import require_tensorrt

            require_tensorrt()
        if config.enable_spatial_approx and select is None:  # token-selection variants (passes/token_select.py)
            from .runtime.token_select import build_token_select

            dev = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
            factory = lambda g, ex, sel: FastCacheBackend(config, mode=mode)(g, ex, select=sel)  # noqa: E731
            runtime = build_token_select(factory, gm, example_inputs, config, search, dev,
                                         clone_outputs=mode == "reduce-overhead")
            if runtime is not None:
                return runtime
        user_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        merge = None
        if config.enable_token_merge:
            gm, merge = apply_token_merge(gm, config, search.regions)
            if merge.applied:
                search = find_blocks(gm)  # the block cache sizes its state from the merged shapes
            else:
                warnings.warn(f"fastcache: token merge left alone: {merge.reason}", stacklevel=2)
        weights, approx = _approx_weights(config, search.regions)
        gm, layout = apply_block_cache(gm, config, search.regions, approx=approx)
        if merge is not None:
            gm, layout = attach_token_merge_state(gm, layout, merge)
        if select is not None:  # a changed token set forces full block computations
            from .passes.token_select import attach_token_select

            gm = attach_token_select(gm)
        device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        online = None
        if layout.online:  # calibration="online": zero maps (residual reuse) until the first refit
            from .runtime.online import OnlineCalibration

            online = OnlineCalibration(layout, config, device)
            weights = online.initial_weights(device)
        extra = []
        for spec in layout.extra_inputs:
            if isinstance(spec, (StateSpec, ControlSpec)):
                extra.append(torch.full(spec.shape, spec.fill, dtype=spec.dtype, device=device))
            elif isinstance(spec, AccumSpec):
                extra.append(online.accum[spec.name])
            else:
                weights[spec.name] = weights[spec.name].to(device)
                extra.append(weights[spec.name])
        log.info("fastcache: %d blocks rewritten (%s), %d left alone", len(layout.blocks), approx, len(layout.left_alone))
        if config.lowering == "tensorrt":  # one engine per glue piece and per branch (#7)
            from .lowering.tensorrt import compile_tensorrt

            compiled = compile_tensorrt(gm, list(example_inputs) + extra, layout.blocks)
        else:
            compiled = compile_graph(gm, list(example_inputs) + extra, mode)
        params = [x for x, n in zip(example_inputs, user_placeholders) if isinstance(x, torch.Tensor) and is_param(n)]
        entry = registry.entry_for_params(params)
        runtime = GraphRuntime(entry, layout, compiled, weights, device, config.trace_steps,
                               clone_outputs=mode == "reduce-overhead")
        runtime.token_merge = merge if merge is not None and merge.applied else None  # read by stats()
        runtime.online = online
        return runtime


def _has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = node_value(n)
        if isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)):
            return True
    return False


def _approx_weights(config: FastCacheConfig, regions) -> tuple[dict, str]:
    """Calibrated weights for ``config.approx`` and the kind actually used."""
    if config.approx == "residual":
        return {}, "residual"
    if config.calibration is None:
        warnings.warn(f"fastcache: approx={config.approx!r} needs a calibration (calibration=path); "
                      "falling back to approx='residual'", stacklevel=3)
        return {}, "residual"
    if config.calibration == "online":
        return {}, config.approx  # the runtime's OnlineCalibration provides the weights
    from .runtime.calibration import load_calibration

    return load_calibration(config.calibration, regions, kind=config.approx, rank=config.rank,
                            time_buckets=config.time_buckets), config.approx


def fastcache_backend(gm: fx.GraphModule, example_inputs: list, *, options=None, mode=None, **kwargs):
    """Entry point of ``backend="fastcache"``: ``options`` are FastCacheConfig fields.

    Raises:
        ValueError: an unknown option or a bad value (named in the message).
    """
    return FastCacheBackend(FastCacheConfig.from_options(options), mode=mode)(gm, example_inputs)
