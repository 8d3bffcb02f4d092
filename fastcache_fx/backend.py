"""The ``fastcache`` Dynamo backend: find blocks, rewrite them into guarded conds, lower once.

    torch.compile(transformer, backend="fastcache", options={"cache_ratio_threshold": 0.05})

``backend="fastcache"`` resolves through the ``torch_dynamo_backends`` entry point to
``fastcache_backend``; ``FastCacheBackend(config)`` is the same thing as a callable object.

Every graph Dynamo hands the backend goes through one pipeline (``FastCacheBackend.__call__``):

1. classify (``plan``): the graph of a whole transformer (block regions found: "model"), the
   graph of one block from regional compilation ("block", ``passes.blocks.find_block_graph``),
   or neither: a ``FallbackRuntime`` (plain Inductor, reported by ``stats()``: glue of a model split
   by graph breaks, or, with one warning, a model without recognisable blocks);
2. the passes of ``PASSES``, in order, each applied when its condition holds; each rewrites the
   graph and says what it adds to the graph's inputs and outputs (the state the runtime carries);
3. one lowering (``lower``: Inductor, or TensorRT engines);
4. the runtime owning the state: ``GraphRuntime`` (whole graph), ``BlockRuntime`` (one block
   graph serving every block of its class), ``TokenSelectRuntime`` (one variant per token
   bucket, each built by this same pipeline).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from .config import FastCacheConfig
from .lowering.inductor import compile_graph
from . import approx as approx_kinds
from . import compat, torch_compat
from .approx import Approximation
from .contract import GraphContract
from .passes.block_cache import BlockCacheResult, apply_block_cache
from .passes.blocks import BlockRegion, find_block_graph, find_blocks, find_timestep, is_param
from .passes.shards import collective_groups
from .passes.graph_utils import has_symbolic_shapes, node_value
from .runtime import registry
from .runtime.prepare import on_graph as prepare_on_graph
from .runtime.shapes import ShapeBinder
from .runtime.state import FallbackRuntime, GraphRuntime, SharedGraph

log = logging.getLogger("fastcache_fx")
_DYNAMO_SIGNALS = torch_compat.dynamo_restart_signals()


@dataclass
class Build:
    """What the pipeline carries from pass to pass for one graph.

    ``gm`` is the current graph; ``contract`` its extra inputs and outputs so far (every pass
    extends it); ``layout`` what the block-cache pass did (``layout.contract`` is the final
    contract); ``approximation`` the approximation kind built; ``weights`` the tensors of its weight
    inputs; ``notes`` what each pass did (``stats()``/logs)."""

    gm: fx.GraphModule
    example_inputs: list
    config: FastCacheConfig
    mode: str | None
    regions: list[BlockRegion]
    kind: str  # "model" or "block"
    dynamic: bool
    select: object = None  # token_select result of the variant being built
    merge: object = None
    contract: GraphContract | None = None
    layout: BlockCacheResult | None = None
    approximation: Approximation | None = None
    weights: dict = field(default_factory=dict)
    online: object = None
    compiled: object = None
    notes: list[str] = field(default_factory=list)
    source: str = ""  # the Dynamo graph's code: a recompile that traced the same graph hands its state over
    note: str | None = None  # why the graph is served otherwise than asked (stats()["notes"])

    @property
    def device(self) -> torch.device:
        return next((x.device for x in self.example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))


# the passes ---------------------------------------------------------------------------------

def _token_merge(b: Build) -> None:
    """Merge tokens between stages (adds the merge state; the block cache sees merged shapes)."""
    from .passes.token_merge import apply_token_merge

    gm, merge = apply_token_merge(b.gm, b.config, b.regions)
    if merge.applied:
        b.gm, b.merge, b.regions, b.contract = gm, merge, find_blocks(gm).regions, merge.contract
        b.notes.append("token_merge")
    else:
        warnings.warn(f"fastcache: token merge left alone: {merge.reason}", stacklevel=4)


def _block_cache(b: Build) -> None:
    """Every block becomes ``cond(approx?, approximation, full block)`` (adds anchors, counters,
    the ``force`` / ``q_ratio`` / clock controls and the calibrated-map inputs)."""
    b.approximation = approx_kinds.resolve(b.config)
    # regional: one graph serves every block of the class, each instance's maps are loaded by the
    # runtime (runtime.regional.BlockRuntime); the graph only gets the weight inputs
    b.weights = {} if b.kind == "block" else b.approximation.weights(b.config, b.regions)
    b.gm, b.layout = apply_block_cache(b.gm, b.config, b.regions, approx=b.approximation,
                                       clock="input" if b.kind == "block" else "graph", contract=b.contract)
    b.contract = b.layout.contract
    b.notes.append(f"block_cache({b.approximation.name})")
    if b.layout.span_reason:
        warnings.warn(f"fastcache: cache_level={b.config.cache_level!r}: {b.layout.span_reason}", stacklevel=4)


def _token_select_force(b: Build) -> None:
    """A changed token set forces full block computations (token-selection variants)."""
    from .passes.token_select import attach_token_select

    b.gm = attach_token_select(b.gm)


def _online_calibration(b: Build) -> None:
    """calibration="online": accumulators as inputs, zero maps (residual reuse) until a refit."""
    from .runtime.online import OnlineCalibration

    b.online = OnlineCalibration(b.layout, b.config, b.device)
    b.weights = b.online.initial_weights(b.device)


@dataclass(frozen=True)
class Pass:
    """One step of the pipeline (the torch.fx pass-infra style: ``requires`` / ``ensures``).

    ``applies(b)``: whether it runs on this build; ``run(b)``: the rewrite (a new graph, an
    extended contract); ``requires``: passes that must have run before it; ``before``: passes
    that must not have run yet (it changes what they would see)."""

    name: str
    applies: Callable[[Build], bool]
    run: Callable[[Build], None]
    requires: tuple[str, ...] = ()
    before: tuple[str, ...] = ()


#: The passes in order. Token selection is not listed: it builds one graph per token bucket
#: (``runtime.token_select``), each through this same list.
PASSES: tuple[Pass, ...] = (
    Pass("token_merge", lambda b: b.config.enable_token_merge, _token_merge, before=("block_cache",)),
    Pass("block_cache", lambda b: True, _block_cache),
    Pass("token_select_force", lambda b: b.select is not None, _token_select_force, requires=("block_cache",)),
    Pass("online_calibration", lambda b: b.layout.online, _online_calibration, requires=("block_cache",)),
)


def check_order(passes: tuple[Pass, ...]) -> None:
    """Raise ``ValueError`` naming the passes when ``passes`` breaks a ``requires`` / ``before``."""
    seen: list[str] = []
    for p in passes:
        missing = [r for r in p.requires if r not in seen]
        late = [r for r in p.before if r in seen]
        if missing or late:
            why = f"needs {missing} before it" if missing else f"must run before {late}"
            raise ValueError(f"fastcache pipeline: pass {p.name!r} {why} (order: {[q.name for q in passes]})")
        seen.append(p.name)


def lower(b: Build):
    """Lower the rewritten graph once: Inductor, or TensorRT engines (one per glue piece and branch)."""
    c = b.contract
    for name in b.weights:
        b.weights[name] = b.weights[name].to(b.device)
    # a block graph's maps come per instance at run time: zeros of their shape to lower with
    weights = {w.name: b.weights.get(w.name, torch.zeros(w.shape, dtype=w.dtype, device=b.device)) for w in c.weights}
    extra = c.bind([_example_value(s, b) for s in c.state], {s.name: _example_value(s, b) for s in c.controls},
                   weights, b.online.accum if b.online is not None else None)
    if b.config.lowering == "tensorrt" and not b.dynamic:
        from .lowering.tensorrt import compile_tensorrt

        return compile_tensorrt(b.gm, list(b.example_inputs) + extra, b.layout.blocks)
    if b.config.lowering == "inductor_split":  # one piece per side of each cond (CUDA graphs on CUDA)
        from .lowering.inductor_split import compile_inductor_split, piece_mode

        return compile_inductor_split(b.gm, list(b.example_inputs) + extra, b.layout.blocks,
                                      piece_mode(b.mode, b.device))
    return compile_graph(b.gm, list(b.example_inputs) + extra, b.mode)


def _example_value(spec, b: Build) -> torch.Tensor:
    """The example value of a state/control input: real for static shapes; in a dynamic graph a
    fake tensor of Dynamo's fake mode (its sizes are the graph's SymInts)."""
    if not any(isinstance(d, torch.SymInt) for d in spec.shape):
        return spec.initial(b.device)
    with torch_compat.detect_fake_mode(b.example_inputs):
        return spec.initial(b.device)


# the backend --------------------------------------------------------------------------------

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

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs):
        config = self.config
        if kwargs.get("options"):
            config = FastCacheConfig.from_options(config, **kwargs["options"])
        mode = kwargs.get("mode") or self.mode
        prepare_on_graph()  # a bare torch.compile: prepare the model once, trace it again (runtime.prepare)
        b = plan(gm, example_inputs, config, mode)
        if isinstance(b, str):  # a fallback, with its reason
            return _fallback(gm, example_inputs, mode, b, [])
        try:
            return self._build(b, gm, example_inputs, mode)
        except _DYNAMO_SIGNALS:
            raise  # Dynamo's own restarts (dynamic=True's scalar tensorification): not a failure
        except Exception as e:  # noqa: BLE001 - the safety net: never fail the user's compile
            # (bad option values were refused by plan() above, before any rewrite); FallbackRuntime
            # gives the one warning and stats()["fallback"] the reason
            first = (str(e).strip().splitlines() or [""])[0][:200]
            log.debug("fastcache: rewrite failed", exc_info=True)
            return _fallback(gm, example_inputs, mode, f"the fastcache rewrite of this graph failed "
                             f"({type(e).__name__}: {first})", [r.name for r in b.regions])

    def _build(self, b: "Build", gm: fx.GraphModule, example_inputs: list, mode):
        """The passes, the lowering and the runtime of a planned graph."""
        if b.kind == "block":
            from .runtime.regional import build_block_runtime

            return build_block_runtime(run_passes(b))
        if b.config.enable_spatial_approx:  # one graph per token bucket (compat.check: static shapes)
            from .runtime.token_select import build_token_select

            runtime = build_token_select(lambda g, ex, sel: build_variant(g, ex, b.config, mode, sel),
                                         gm, example_inputs, b.config, b.regions, b.device,
                                         clone_outputs=mode == "reduce-overhead")
            if runtime is not None:
                return runtime
        return shared_runtime(run_passes(b))


def plan(gm: fx.GraphModule, example_inputs: list, config: FastCacheConfig, mode: str | None) -> Build | str:
    """Classify a Dynamo graph: a Build for the pipeline, or the reason for a plain-Inductor fallback.

    Raises:
        ValueError: an option this graph cannot run (``compat.check``: token selection / token
            merge in regional compilation or under context parallelism).
        RuntimeError: ``lowering="tensorrt"`` without CUDA / torch_tensorrt.
    """
    dynamic = has_symbolic_shapes(gm)
    note = None
    search = find_blocks(gm)
    kind, regions = "model", search.regions
    if not regions:
        block = find_block_graph(gm)
        if isinstance(block, str):
            left = f" (left alone: {search.left_alone})" if search.left_alone else ""
            return f"no transformer blocks recognised in this graph{left}: {block}"
        kind, regions = "block", [block]
        if config.cache_level != "block":  # Dynamo's own block graph: serve it, never fail the compile
            note = (f"cache_level={config.cache_level!r} needs the whole transformer in one graph; Dynamo handed "
                    f"the backend the graph of one {block.module_type} (graph breaks between the blocks), served at "
                    "cache_level='block'")
            _warn_once(note)
            config = block_level(config)
    elif (refused := not_a_denoiser(gm)) is not None:
        return refused
    if config.lowering == "tensorrt":
        from .lowering.tensorrt import require_tensorrt

        require_tensorrt()
    config = compat.check(config, compat.Target(block_graph=kind == "block", dynamic=dynamic,
                                                collectives=bool(collective_groups(gm))), stacklevel=4)
    b = Build(gm, list(example_inputs), config, mode, regions, kind, dynamic, source=gm.code)
    if note is not None:
        b.note = note
    return b


def block_level(config: FastCacheConfig) -> FastCacheConfig:
    """``config`` served at the block level: the step / span levels' own options (front and back
    blocks, spans, the split lowering) dropped, the rest kept (HiDream, HunyuanVideo 1.5: Dynamo
    hands the backend one block's graph)."""
    from .config_rules import LEVEL_KNOBS

    drop = {n: None for n in (*LEVEL_KNOBS, "num_spans", "span_sizes")}
    if config.lowering == "inductor_split":
        drop["lowering"] = "inductor"
    return config.replace(cache_level="block", **drop)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One warning per message per process (every block class of a model would repeat it)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"fastcache: {message}", stacklevel=5)


def not_a_denoiser(gm: fx.GraphModule) -> str | None:
    """Why a graph with blocks is not a DiT denoiser's, or None when it may be one.

    A diffusion denoiser is conditioned on the timestep; a module whose traced ``forward`` gets no
    timestep tensor (a UNet's ``TransformerTemporalModel``, its ``Transformer2DModel`` layers) is a
    layer of a denoiser, and a step cache on it would reuse across calls that are not steps. A
    graph Dynamo resumed after a graph break (``torch_dynamo_resume_in_*``) is a fragment of the
    model, whose timestep an earlier fragment took, so it is not judged here."""
    code = torch_compat.traced_code()
    if code is None or code.co_name != "forward":
        return None
    if find_timestep([n for n in gm.graph.nodes if n.op == "placeholder"]) is not None:
        return None
    return (f"not a DiT denoiser: {getattr(code, 'co_qualname', code.co_name)} was traced without a timestep "
            "tensor (a layer of a denoiser, such as a UNet's temporal transformer, gets no step cache)")


def run_passes(b: Build, passes: tuple[Pass, ...] = PASSES) -> Build:
    """Run ``passes`` on ``b`` in order (each whose condition holds) and lower the result.

    Raises:
        ValueError: ``passes`` in an order that breaks a pass's ``requires`` / ``before``."""
    check_order(passes)
    for p in passes:
        if p.applies(b):
            p.run(b)
    log.info("fastcache: %s graph, %d blocks rewritten (%s), passes %s", b.kind, len(b.layout.blocks),
             b.layout.approx, b.notes)
    b.compiled = lower(b)
    return b


def runtime_for(b: Build, entry: registry.ModelEntry | None = None) -> GraphRuntime:
    """The GraphRuntime of a lowered whole-transformer graph, registered with its model (``entry``,
    or the one its example parameters belong to). With online calibration each model gets its own
    accumulators and maps."""
    phs = _placeholders(b.gm, len(b.example_inputs))
    if entry is None:
        entry = registry.entry_for_params([x for x, n in zip(b.example_inputs, phs)
                                           if isinstance(x, torch.Tensor) and is_param(n)])
    runtime = GraphRuntime(entry, b.layout, b.compiled, b.weights, b.device, b.config.trace_steps,
                           # the split pieces copy their outputs out of the pool themselves
                           clone_outputs=b.mode == "reduce-overhead" and b.config.lowering != "inductor_split",
                           binder=ShapeBinder([node_value(p) for p in phs]) if b.dynamic else None,
                           significance_level=b.config.significance_level, trace_requests=b.config.trace_requests,
                           max_live_requests=b.config.max_live_requests)
    runtime.token_merge = b.merge
    runtime.source = b.source
    runtime.online = b.online
    runtime.timestep_at = next((i for i, p in enumerate(phs) if p.name == b.layout.timestep_input), None)
    return runtime


def shared_runtime(b: Build) -> SharedGraph:
    """The callable Dynamo gets for a whole-transformer graph: one GraphRuntime per model that
    the compiled graph serves (``runtime.state.SharedGraph``)."""
    from .runtime.online import OnlineCalibration

    def make(entry):
        if b.layout.online:  # another model: its own statistics and maps
            b.online = OnlineCalibration(b.layout, b.config, b.device)
            b.weights = b.online.initial_weights(b.device)
        return runtime_for(b, entry)

    param_at = [i for i, (x, n) in enumerate(zip(b.example_inputs, _placeholders(b.gm, len(b.example_inputs))))
                if isinstance(x, torch.Tensor) and is_param(n)]
    return SharedGraph(runtime_for(b), param_at, make)


def build_variant(gm: fx.GraphModule, example_inputs: list, config: FastCacheConfig, mode: str | None, select):
    """One token-selection variant graph through the pipeline (``runtime.token_select`` calls it)."""
    b = Build(gm, list(example_inputs), config, mode, find_blocks(gm).regions, "model", False, select=select)
    return runtime_for(run_passes(b))


def _placeholders(gm: fx.GraphModule, n: int) -> list[fx.Node]:
    return [p for p in gm.graph.nodes if p.op == "placeholder"][:n]


def _fallback(gm, example_inputs, mode, reason: str, blocks: list[str]) -> FallbackRuntime:
    """Plain Inductor, registered so that ``stats()`` reports it: glue of a model split by a graph
    break, or (one warning, at its second call) a model without recognisable blocks."""
    log.debug("fastcache: %s; compiled with plain Inductor", reason)
    phs = _placeholders(gm, len(example_inputs))
    params = [x for x, n in zip(example_inputs, phs) if isinstance(x, torch.Tensor) and is_param(n)]
    ts = find_timestep(phs)
    return FallbackRuntime(registry.entry_for_params(params), compile_graph(gm, example_inputs, mode), reason, blocks,
                           timestep_at=phs.index(ts) if ts is not None else None)


def fastcache_backend(gm: fx.GraphModule, example_inputs: list, *, options=None, mode=None, **kwargs):
    """Entry point of ``backend="fastcache"``: ``options`` are FastCacheConfig fields.

    Raises:
        ValueError: an unknown option or a bad value (named in the message).
    """
    return FastCacheBackend(FastCacheConfig.from_options(options), mode=mode)(gm, example_inputs)
