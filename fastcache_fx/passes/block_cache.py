"""Rewrite every block region into ``torch.cond(approx?, approx_branch, full_branch, operands)``.

The per-block cache state (anchor input, anchor residual, consecutive-approximation counter, and
what the approximation kind keeps: ``fastcache_fx.approx``) and the trajectory clock (step
counter, previous timestep; shared with an earlier pass's) become extra graph inputs; their new
values become extra graph outputs, with three [L] trace tensors (delta, threshold, decision) and,
online, the new accumulators. All of it is registered in the graph contract
(``contract.GraphContract``, ``BlockCacheResult.contract``), which the runtimes and export use
to bind and split it. The graph stays functional, so one ``compile_fx`` call lowers it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import approx as approx_kinds
from .. import torch_compat
from ..approx import Approximation, Slots
from ..approx.base import meta as _meta
from ..config import FastCacheConfig
from ..contract import GraphContract
from ..ops import decision as D
from ..ops import forecast
from ..ops import output_error as O
from .blocks import BlockRegion, find_blocks, find_timestep, remap_region, tensor_meta
from .shards import collective_groups, group_size, sum_weights, token_segments, token_shards
from .spans import SpanResult, group_spans
from .graph_utils import clone_graph_module, node_value
from .branches import approx_branch, fake_flat, full_branch, scalar_constants
from .extra_io import Cursor, ExtraIO, symbolic
from .operands import contiguous_operands
from .output_budget import finish_output_budget, output_budget, tail_streams, weigh


@dataclass
class BlockCacheResult:
    """What ``apply_block_cache`` did: the blocks it rewrote and the graph contract (extra inputs
    and outputs, ``contract.GraphContract``) the runtimes and export bind and split."""

    blocks: list[str]
    stream_shapes: list[list[tuple]]
    thresholds: list[float | None]  # None where ND is symbolic (the bound then depends on the call's shape)
    contract: GraphContract
    timestep_input: str | None = None
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    kind: Approximation = field(default_factory=lambda: approx_kinds.KINDS["residual"])
    rank: int | None = None
    time_buckets: int = 1
    online: bool = False
    dofs: list = field(default_factory=list)  # ND per block (whole sequence): int, or SymInt in a dynamic-shape graph
    groups: list[str] = field(default_factory=list)  # process groups the decision sums are all-reduced over
    shards: list[list] = field(default_factory=list)  # per block and stream: ranks its tokens are split over (int), or its segments ((tokens, ranks), ...)
    mesh: int = 1  # M: product of the groups' sizes; sum_over_groups returns a replicated value times M
    output_shards: dict = field(default_factory=dict, repr=False)  # user output node -> ranks its tokens are split over
    level: str = "block"  # FastCacheConfig.cache_level the regions were grouped at
    sizes: list[int] = field(default_factory=list)  # blocks per region (1 at the block level; a span's depth)
    uncached: list[str] = field(default_factory=list)  # front / back blocks computed every step, outside any cond
    span_reason: str = ""  # why a span could not be formed (its blocks were kept as separate regions)

    @property
    def approx(self) -> str:
        """The approximation kind's name."""
        return self.kind.name

    @property
    def dynamic(self) -> bool:
        """The graph has symbolic shapes: state shapes and ``q_ratio`` depend on the call."""
        return any(isinstance(d, torch.SymInt) for d in self.dofs)

    # the contract's views, for readers of the layout
    num_user_inputs = property(lambda self: self.contract.num_user_inputs)
    num_user_outputs = property(lambda self: self.contract.num_user_outputs)
    output_is_tuple = property(lambda self: self.contract.output_is_tuple)
    extra_inputs = property(lambda self: self.contract.inputs)
    state = property(lambda self: self.contract.state)
    controls = property(lambda self: self.contract.controls)
    weights = property(lambda self: self.contract.weights)
    accums = property(lambda self: self.contract.accums)


def _numel(shape) -> int | torch.SymInt:
    n = 1
    for d in shape:
        n = n * d
    return n


def apply_block_cache(gm: fx.GraphModule, config: FastCacheConfig, regions: list[BlockRegion] | None = None,
                      *, approx: str | Approximation | None = None, clock: str = "graph",
                      contract: GraphContract | None = None) -> tuple[fx.GraphModule, BlockCacheResult]:
    """Rewrite a copy of ``gm`` so each block region becomes a guarded ``torch.cond``.

    Args:
        gm: a Dynamo graph (parameters as placeholders).
        config: thresholds, warmup, approximation kind, decision rule.
        regions: from ``find_blocks(gm)``; found here when None.
        approx: the approximation kind (``fastcache_fx.approx``: an object or its name),
            overriding ``config.approx`` (the backend passes the resolved kind: "residual" when
            ``linear`` has no calibration).
        clock: "graph": the graph counts steps itself from its timestep input (the trajectory
            clock, shared with an earlier pass's); "input": the graph of one block in regional
            compilation, where the runtime's step clock passes ``step`` [] int64 and ``t`` []
            float32 as control inputs every call.
        contract: the graph contract of an earlier pass on ``gm`` (token merge), extended with
            this pass's inputs and outputs; None: ``gm``'s own inputs and outputs are the user's.

    Returns:
        (new gm, BlockCacheResult); ``gm`` and ``contract`` are not modified. With no region the
        copy is unchanged and ``result.blocks`` is empty.

    Raises:
        ValueError: an unknown ``clock`` or approximation kind.
    """
    if clock not in ("graph", "input"):
        raise ValueError(f"clock: expected 'graph' or 'input', got {clock!r}")
    search = find_blocks(gm) if regions is None else None
    regions = search.regions if regions is None else regions
    gm, val_map = clone_graph_module(gm)
    regions = [remap_region(r, val_map) for r in regions]
    # the step and span levels: a run of blocks becomes one region (one cond, one anchor); a block
    # graph of regional compilation is one block (compat.check refuses the levels there)
    spans = group_spans(gm, regions, config) if clock == "graph" else SpanResult(regions, [1] * len(regions))
    regions = spans.regions
    kind = approx_kinds.get(approx or config.approx) if not isinstance(approx, Approximation) else approx
    if contract is not None:  # extended, not modified
        contract = GraphContract(contract.num_user_inputs, contract.num_user_outputs, contract.output_is_tuple,
                                 list(contract.inputs), list(contract.outputs))
    io = ExtraIO(gm.graph, contract)
    result = _new_result(regions, spans, search, io, kind, config, clock)
    if not regions:
        return gm, result
    placeholders = io.placeholders
    ts = find_timestep(placeholders)
    result.timestep_input = ts.name if ts is not None else None
    if clock == "graph":
        step_node, t_node = io.clock(ts)
    else:
        step_node = io.control("step", (), torch.int64, 0)
        t_node = io.control("t", (), torch.float32, 0.0)
    force_in = io.control("force", (len(regions),), torch.int8, -1)
    _degrees_of_freedom(gm, regions, result)
    q_in = (io.control("q_ratio", (len(regions),), torch.float32, float("nan"))
            if result.dynamic and config.decision == "chi2" else None)  # the bound depends on the call's shape
    size_symbols = [p for p in placeholders if isinstance(node_value(p), torch.SymInt)
                    and getattr(node_value(p).node.expr, "is_Symbol", False)]
    trace: list[tuple[fx.Node, fx.Node, fx.Node]] = []
    remap: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond getitems
    budget = output_budget(io, regions, config)
    for k, region in enumerate(regions):
        region = BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                             [remap.get(n, n) for n in region.stream_inputs], region.stream_outputs,
                             [remap.get(n, n) for n in region.context_inputs], region.param_inputs)
        trace.append(_rewrite_block(gm, io, result, k, region, config, step_node, t_node, force_in, q_in,
                                    size_symbols, remap, budget, last=k == len(regions) - 1))
    graph = gm.graph
    if budget is not None:
        finish_output_budget(io, result, budget, step_node)
    with graph.inserting_before(io.out_node):
        for i, name in enumerate(("delta", "threshold", "approx")):
            io.output("trace", name, graph.call_function(torch.stack, ([t[i] for t in trace],)))
    io.finish()
    _relint(gm)
    return gm, result


def _new_result(regions, spans, search, io: ExtraIO, kind: Approximation, config: FastCacheConfig,
                clock: str) -> BlockCacheResult:
    """The pass's record before any block is rewritten."""
    return BlockCacheResult(
        blocks=[r.name for r in regions], stream_shapes=[r.stream_shapes for r in regions], thresholds=[],
        contract=io.contract, left_alone=list(search.left_alone) if search else [], kind=kind,
        rank=config.rank if kind.calibrated else None, time_buckets=config.time_buckets if kind.calibrated else 1,
        online=kind.calibrated and config.calibration == "online",
        level=config.cache_level if clock == "graph" else "block", sizes=spans.sizes, uncached=spans.uncached,
        span_reason=spans.reason)


def _relint(gm: fx.GraphModule) -> None:
    """Check and recompile ``gm`` (topologically re-sorted when a rewrite left a node before its
    inputs)."""
    try:
        gm.graph.lint()
    except Exception:
        from torch.fx.passes.tools_common import legalize_graph

        legalize_graph(gm)
        gm.graph.lint()
    gm.recompile()


def _whole_numel(shape, k) -> int | torch.SymInt:
    """Elements per sample of the whole sequence of a stream of local ``shape`` split over k ranks
    (or over the ranks of each token segment ((tokens, k), ...))."""
    if isinstance(k, tuple):
        return sum(n * kk for n, kk in k) * _numel(shape[2:])
    return _numel(shape[1:]) * k


def _degrees_of_freedom(gm: fx.GraphModule, regions: list[BlockRegion], result: BlockCacheResult) -> None:
    """ND per block (``result.dofs``) and, under context parallelism, the groups, the token shards
    of the streams and of the model's outputs, and the mesh multiplicity M.

    Each rank holds 1/k of a stream's tokens (k = 1: the whole stream, replicated on every rank);
    ND and the decision sums are those of the whole sequence."""
    result.groups = collective_groups(gm)
    sizes = {g: n for g in result.groups if (n := group_size(g)) is not None}
    shards = token_shards(gm, result.groups, sizes) if result.groups else {}
    for n in sizes.values():
        result.mesh *= n
    segments = token_segments(gm, shards) if shards else {}
    result.shards = [[segments.get(h, shards.get(h, 1)) for h in r.stream_inputs] for r in regions]
    result.dofs = [sum(_whole_numel(tensor_meta(h)[0], k) for h, k in zip(r.stream_inputs, ks))
                   for r, ks in zip(regions, result.shards)]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    result.output_shards = {o: shards.get(o, 1) for o in out.all_input_nodes}


def _block_inputs(io: ExtraIO, region: BlockRegion, metas: list, config: FastCacheConfig,
                  result: BlockCacheResult) -> dict:
    """The state and weight inputs of one block (the common anchors and counter, the decision
    rule's estimate, the approximation kind's own)."""
    name, kind = region.name, result.kind
    store = [config.store_dtype(m[1]) for m in metas]
    h = {"a_in": [io.state(f"{name}.anchor_in.{s}", m[0], store[s], 0.0) for s, m in enumerate(metas)],
         "a_res": [io.state(f"{name}.anchor_res.{s}", m[0], store[s], 0.0) for s, m in enumerate(metas)],
         "consec": io.state(f"{name}.consecutive", (), torch.int64, 0), "prev": None, "est": None}
    if config.reference == "previous":
        h["prev"] = [io.state(f"{name}.previous_in.{s}", m[0], store[s], 0.0) for s, m in enumerate(metas)]
    h["kind"] = kind.add_inputs(io, name, metas, config)
    if config.measures_error:  # running estimate of e / delta, and the last measured e
        h["est"] = io.state(f"{name}.error_per_delta", (), torch.float32, float("nan"))
        h["last_err"] = io.state(f"{name}.error", (), torch.float32, float("nan"))
    h["kind"].update(kind.add_weights(io, name, metas, config, result))
    return h


def _cond_operands(region: BlockRegion, h: dict, kind: Approximation, config: FastCacheConfig,
                   result: BlockCacheResult, t_node, size_symbols) -> tuple[list[fx.Node], Slots]:
    """A block's cond operands (streams, contexts, parameters, then the cache state its branches
    read) and where each sits (``Slots``)."""
    operands = list(region.stream_inputs) + list(region.context_inputs) + list(region.param_inputs)

    def take(nodes: list[fx.Node]) -> list[int]:
        operands.extend(nodes)
        return list(range(len(operands) - len(nodes), len(operands)))

    slots = Slots(stream=list(range(len(region.stream_inputs))), res=take(h["a_res"]), anchor_in=take(h["a_in"]))
    slots.kind = kind.take_operands(h["kind"], take)
    if kind.needs_t(config, result):
        slots.t = take([t_node])[0]
    # the size symbols themselves, so that the lowered branches can bind every symbol their
    # inputs' sizes use (Inductor codegens a subgraph from its own inputs only)
    take([p for p in size_symbols if p not in operands])
    return operands, slots


def _read_streams(cur: Cursor, cond, region: BlockRegion, streams: list, first: int) -> list:
    """One node per output stream, read from ``cond``'s outputs from position ``first`` (a flat
    output of symbolic shape, ``branches.flat_if_symbolic``, viewed back as its stream input)."""
    out = []
    for s, o in enumerate(region.stream_outputs):
        v = node_value(o)
        if symbolic(v.shape):
            flat = cur.get(cond, first + s, val=fake_flat(v))
            out.append(cur.method("view_as", flat, streams[s], val=v))
        else:
            out.append(cur.get(cond, first + s, val=v))
    return out


def _decision_kwargs(cur: Cursor, h: dict, kind: Approximation, config: FastCacheConfig, result: BlockCacheResult,
                     k: int, q, q_in, force_in, weights, budget: dict | None) -> dict:
    """The keyword arguments of ``decision.block_decision`` for block ``k``."""
    kw = dict(q_ratio=q, tau=config.cache_ratio_threshold, beta=config.adaptive_beta,
              timestep_max=config.timestep_max, min_step=max(1, config.warmup_steps),
              max_consecutive=config.max_consecutive_approx, enabled=config.enable_block_approx,
              groups=tuple(result.groups), stream_weights=weights)
    if q_in is not None:
        kw["q_ratio"] = cur.get(q_in, k, val=_meta())
    kw.update(kind.decision_kwargs(cur, h["kind"]))
    if h["est"] is not None:
        kw.update(error_per_delta=h["est"], error_budget=config.error_budget)
    if budget is not None:
        kw.update(output_gain=budget["weighted_gain"], spent=budget["spent"])
    kw["force"] = cur.get(force_in, k, val=_meta((), torch.int8))
    return kw


def _rewrite_block(gm: fx.GraphModule, io: ExtraIO, result: BlockCacheResult, k: int, region: BlockRegion,
                   config: FastCacheConfig, step_node, t_node, force_in, q_in, size_symbols, remap,
                   budget: dict | None = None, last: bool = False) -> tuple:
    """Replace block ``k``'s nodes by ``cond(approx?, approximation, full block)``, register its
    new state; returns its (delta, threshold, approx) nodes. ``budget``: the output budget's
    nodes (``output_budget.output_budget``), whose spent budget this block's decision adds to; the ``last``
    block also returns its error for the gain measurement."""
    graph, kind = gm.graph, result.kind
    region, consts = scalar_constants(graph, region)
    tag = re.sub(r"\W", "_", region.name)
    metas = [tensor_meta(hh) for hh in region.stream_inputs]
    n = len(metas)
    h = _block_inputs(io, region, metas, config, result)
    q = None
    if q_in is None and config.decision == "chi2":  # ND: elements per sample over the block's streams
        q = D.chi2_quantile_ratio(config.significance_level, result.dofs[k])
        result.thresholds.append(config.cache_ratio_threshold * q ** 0.5)
    else:  # symbolic ND (a per-call input), or the error rule (a per-block estimate)
        result.thresholds.append(None)

    operands, slots = _cond_operands(region, h, kind, config, result, t_node, size_symbols)
    # context parallelism: each stream's local sums are scaled by k / M before the all-reduce,
    # so that every element of the whole sequence enters the sums once (see sum_weights)
    weights = sum_weights(result.shards[k], result.mesh, result.groups)
    return_error = budget is not None and last and budget["tail"]
    gm.add_submodule(f"fc_{tag}_full", full_branch(region, operands, slots, kind, config, consts=consts,
                                                  stream_weights=weights, return_error=return_error))
    gm.add_submodule(f"fc_{tag}_approx", approx_branch(region, operands, slots, kind, config,
                                                      return_error=return_error))

    members = set(region.nodes)
    cur = Cursor(graph, region.nodes[-1])
    operands, streams = contiguous_operands(cur, region, operands)

    if budget is not None:
        weigh(cur, budget)
    kw = _decision_kwargs(cur, h, kind, config, result, k, q, q_in, force_in, weights, budget)
    refs = h["prev"] if h["prev"] is not None else h["a_in"]
    ok, delta, thr = cur.unpack(cur.call(D.block_decision, streams, refs, step_node, h["consec"], t_node, **kw), 3)
    if budget is not None:
        budget["spent"] = cur.call(O.spend, budget["spent"], ok, delta, h["est"], budget["weighted_gain"],
                                   val=_meta())
    with graph.inserting_after(cur.node):
        attr_t = graph.get_attr(f"fc_{tag}_approx")
    with graph.inserting_after(attr_t):
        attr_f = graph.get_attr(f"fc_{tag}_full")
    cur.node = attr_f
    cond = cur.call(torch_compat.cond_op(), ok, attr_t, attr_f, tuple(operands))
    outs = _read_streams(cur, cond, region, streams, 0)
    eps = _read_streams(cur, cond, region, streams, n + 2) if return_error else None
    err_node = _new_state(io, cur, h, kind, config, result, ok, streams, outs, delta, step_node, t_node, cond, n,
                          skip=len(eps or ()))
    if return_error:
        budget["last"] = {"ok": ok, "e": err_node, "outs": outs, "eps": eps,
                          "streams": tail_streams(io, region.stream_outputs)}

    for o, gi in zip(region.stream_outputs, outs):
        o.replace_all_uses_with(gi, delete_user_cb=lambda u: u not in members)
        remap[o] = gi
    for node in reversed(region.nodes):
        graph.erase_node(node)
    return delta, thr, ok


def _new_state(io: ExtraIO, cur: Cursor, h: dict, kind: Approximation, config: FastCacheConfig,
               result: BlockCacheResult, ok, streams, outs, delta, step_node, t_node, cond, n: int,
               skip: int = 0):
    """Register the new values of one block's state (and accumulators) as graph outputs; returns
    the node of this step's measured error e (NaN if not measured), or None without one.

    cond outputs: the n streams, then the error rule's (err2, ref2), then ``skip`` more (the last
    block's errors under the output rule), then the kind's extras."""
    extra = n
    err_node = None
    if h["est"] is not None:
        err2, ref2 = (cur.get(cond, extra + j) for j in range(2))
        extra += 2 + skip
    new_in, new_res, new_consec = cur.unpack(cur.call(D.update_state, ok, streams, outs, h["a_in"], h["a_res"],
                                                      h["consec"]), 3)
    new = list(zip(h["a_in"], (cur.get(new_in, s) for s in range(n))))
    new += list(zip(h["a_res"], (cur.get(new_res, s) for s in range(n)))) + [(h["consec"], new_consec)]
    if h["prev"] is not None:
        new += list(zip(h["prev"], cur.unpack(cur.call(D.update_previous, streams, h["prev"]), n)))
    new += kind.update(cur, h["kind"], ok, streams, outs, h["a_res"], step_node, t_node, (cond, extra), config)
    if h["est"] is not None:
        new += list(zip((h["est"], h["last_err"]), cur.unpack(cur.call(
            forecast.update_error_estimate, ok, err2, ref2, delta, step_node, h["est"], h["last_err"],
            groups=tuple(result.groups), verify=config.decision == "output"), 2)))
        err_node = new[-1][1]
    model = {tensor_meta(x)[1] for x in streams}
    lowered = {config.store_dtype(d) for d in model} - model  # ``state_dtype``: cast before it is stored
    for ph, node in new:
        spec = io.specs[ph]
        if len(spec.shape) and spec.dtype in lowered:
            node = cur.method("to", node, spec.dtype)
        io.output(spec.role, spec.name, node)
    return err_node
