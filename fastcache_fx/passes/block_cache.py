"""Rewrite every block region into ``torch.cond(approx?, approx_branch, full_branch, operands)``.

The per-block cache state (anchor input, anchor residual, consecutive-approximation counter) and
the trajectory state (step counter, previous timestep) become extra graph inputs; their new
values become extra graph outputs, followed by three [L] trace tensors (delta, threshold,
decision). The graph stays functional, so one ``compile_fx`` call lowers it, and the runtime
(``fastcache_fx.runtime``) owns the state between calls. Layout of the rewritten graph:

    inputs  = original inputs + extra inputs (``BlockCacheResult.extra_inputs``: state, the
              ``force`` control [L] int8, calibrated weights, in placeholder order)
    outputs = original outputs + new state (same order) + (delta [L], threshold [L], approx [L])
              + new online accumulators (``BlockCacheResult.accums`` order; calibration="online")
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import FastCacheConfig
from ..runtime import decision as D
from ..runtime.calibration import weight_shapes
from ..runtime import forecast as F
from .blocks import (BlockRegion, clone_graph_module, collective_groups, find_blocks, find_timestep, graph_io,
                     insert_placeholder, node_value, remap_region, tensor_meta, token_shards)
from .branches import ACCUM_KEYS, Slots, approx_branch, fake_flat, full_branch, scalar_constants, set_val, symbolic


@dataclass
class StateSpec:
    """One state tensor the runtime must provide: name, shape (ints, or SymInts for dynamic
    graphs), dtype and initial fill value."""

    name: str
    shape: tuple
    dtype: torch.dtype
    fill: float


@dataclass
class WeightSpec:
    """A calibrated weight input: ``kind`` is "weight" [D, D] or "bias" [D] of ``block``/``stream``."""

    name: str
    block: str
    stream: int
    kind: str
    shape: tuple
    dtype: torch.dtype


@dataclass
class ControlSpec:
    """A per-call control input the runtime sets (not carried between calls): ``force`` is int8
    [L], one entry per block: -1 decide live, 0 force a full computation, 1 force the
    approximation (used to replay a decision trace, ``fastcache_fx.replay_decisions``).
    ``q_ratio`` (graphs with symbolic shapes only) is float32 [L], chi2.ppf(1 - alpha, ND) / ND of
    each block for the shape of the call (``BlockCacheResult.dofs``), computed by the runtime."""

    name: str
    shape: tuple
    dtype: torch.dtype
    fill: float


@dataclass
class AccumSpec:
    """An online-calibration accumulator (``calibration="online"``): ``key`` in n [K], sx [K, D],
    sy [K, D], xtx [K, D, D], xty [K, D, D], yty [K] (float64, zeros at start) of
    ``block``/``stream``. Carried between calls by ``runtime.online.OnlineCalibration`` (not per
    context, kept across ``reset()``); its new value is a graph output after the trace tensors."""

    name: str
    block: str
    stream: int
    key: str
    shape: tuple
    dtype: torch.dtype


@dataclass
class BlockCacheResult:
    """What ``apply_block_cache`` did (the runtime's contract with the rewritten graph)."""

    blocks: list[str]
    stream_shapes: list[list[tuple]]
    thresholds: list[float | None]  # None where ND is symbolic (the bound then depends on the call's shape)
    num_user_inputs: int
    num_user_outputs: int
    output_is_tuple: bool
    state: list[StateSpec] = field(default_factory=list)
    weights: list[WeightSpec] = field(default_factory=list)
    controls: list[ControlSpec] = field(default_factory=list)
    accums: list[AccumSpec] = field(default_factory=list)
    extra_inputs: list = field(default_factory=list)  # StateSpec | ControlSpec | WeightSpec | AccumSpec in placeholder order
    timestep_input: str | None = None
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    approx: str = "residual"
    rank: int | None = None
    time_buckets: int = 1
    online: bool = False
    dofs: list = field(default_factory=list)  # ND per block (whole sequence): int, or SymInt in a dynamic-shape graph
    groups: list[str] = field(default_factory=list)  # process groups the decision sums are all-reduced over
    shards: list[list[int]] = field(default_factory=list)  # per block and stream: ranks its tokens are split over

    @property
    def dynamic(self) -> bool:
        """The graph has symbolic shapes: state shapes and ``q_ratio`` depend on the call."""
        return any(isinstance(d, torch.SymInt) for d in self.dofs)


def _numel(shape) -> int | torch.SymInt:
    n = 1
    for d in shape:
        n = n * d
    return n


def _placeholder_value(shape, dtype: torch.dtype, placeholders: list[fx.Node]) -> torch.Tensor:
    """The ``meta["val"]`` of a new state input: a meta tensor, or, for a symbolic shape, a fake
    tensor of the graph's own fake mode (its SymInts belong to that mode's ShapeEnv)."""
    if not symbolic(shape):
        return torch.empty(shape, dtype=dtype, device="meta")
    vals = [node_value(p) for p in placeholders]
    mode = next(v.fake_mode for v in vals if hasattr(v, "fake_mode"))
    device = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
    with mode:
        return torch.empty(shape, dtype=dtype, device=device)


def _contiguous_meta(v: torch.Tensor) -> torch.Tensor:
    """The example value of ``v.contiguous()`` (fake or meta)."""
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    with mode:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _meta(shape=(), dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


class _Cursor:
    """Inserts nodes one after another from a position in a graph."""

    def __init__(self, graph: fx.Graph, after: fx.Node) -> None:
        self.graph, self.node = graph, after

    def call(self, fn, *args, val=None, **kwargs) -> fx.Node:
        with self.graph.inserting_after(self.node):
            self.node = self.graph.call_function(fn, args, kwargs)
        return set_val(self.node, val) if val is not None else self.node

    def method(self, name: str, *args, val=None) -> fx.Node:
        with self.graph.inserting_after(self.node):
            self.node = self.graph.call_method(name, args)
        return set_val(self.node, val) if val is not None else self.node

    def get(self, node: fx.Node, i: int, val=None) -> fx.Node:
        return self.call(operator.getitem, node, i, val=val)

    def unpack(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self.get(node, i) for i in range(n)]


def insert_trajectory_step(graph: fx.Graph, before: fx.Node, timestep: fx.Node | None, prev_t: fx.Node,
                           step: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Insert ``runtime.decision.trajectory_step`` before ``before``: (step [] int64, t [] float32)
    nodes, with ``meta["val"]`` set. Every pass that keeps per-trajectory state counts steps so."""
    with graph.inserting_before(before):
        traj = graph.call_function(D.trajectory_step, (timestep, prev_t, step))
        step_node = set_val(graph.call_function(operator.getitem, (traj, 0)), _meta((), torch.int64))
        t_node = set_val(graph.call_function(operator.getitem, (traj, 1)), _meta())
    return step_node, t_node


def apply_block_cache(gm: fx.GraphModule, config: FastCacheConfig, regions: list[BlockRegion] | None = None,
                      *, approx: str | None = None, clock: str = "graph") -> tuple[fx.GraphModule, BlockCacheResult]:
    """Rewrite a copy of ``gm`` so each block region becomes a guarded ``torch.cond``.

    Args:
        gm: a Dynamo graph (parameters as placeholders).
        config: thresholds, warmup, approximation kind, decision rule.
        regions: from ``find_blocks(gm)``; found here when None.
        approx: overrides ``config.approx`` (the backend passes "residual" when ``linear`` has
            no calibration).
        clock: "graph": the graph counts steps itself from its timestep input (``step`` and
            ``prev_t`` are state, the new values are the first state outputs); "input": the graph of
            one block in regional compilation, where the runtime's step clock passes ``step`` []
            int64 and ``t`` [] float32 as control inputs (``ControlSpec``) every call.

    Returns:
        (new gm, BlockCacheResult); ``gm`` itself is not modified. With no region the copy is
        unchanged and ``result.blocks`` is empty.

    Raises:
        ValueError: an unknown ``clock``.
    """
    if clock not in ("graph", "input"):
        raise ValueError(f"clock: expected 'graph' or 'input', got {clock!r}")
    search = find_blocks(gm) if regions is None else None
    regions = search.regions if regions is None else regions
    gm, val_map = clone_graph_module(gm)
    regions = [remap_region(r, val_map) for r in regions]
    approx = approx or config.approx
    learned = approx in ("linear", "residual_linear")
    graph = gm.graph
    placeholders, out_node, orig_outs, is_tuple = graph_io(graph)
    result = BlockCacheResult(
        blocks=[r.name for r in regions], stream_shapes=[r.stream_shapes for r in regions], thresholds=[],
        num_user_inputs=len(placeholders), num_user_outputs=len(orig_outs), output_is_tuple=is_tuple,
        left_alone=list(search.left_alone) if search else [], approx=approx,
        rank=config.rank if learned else None, time_buckets=config.time_buckets if learned else 1,
        online=learned and config.calibration == "online",
    )
    if not regions:
        return gm, result
    online, nk, order = result.online, result.time_buckets, config.taylor_order
    last_ph = placeholders[-1]

    def add_input(name: str, val, spec) -> fx.Node:
        nonlocal last_ph
        last_ph = insert_placeholder(graph, last_ph, "fc_" + re.sub(r"\W", "_", name), val)
        {StateSpec: result.state, ControlSpec: result.controls, AccumSpec: result.accums}.get(
            type(spec), result.weights).append(spec)
        result.extra_inputs.append(spec)
        return last_ph

    def state_input(name: str, shape, dtype, fill: float) -> fx.Node:
        return add_input(name, _placeholder_value(shape, dtype, placeholders), StateSpec(name, tuple(shape), dtype, fill))

    def control_input(name: str, shape, dtype, fill: float) -> fx.Node:
        return add_input(name, _meta(shape, dtype), ControlSpec(name, tuple(shape), dtype, fill))

    # trajectory state and per-call controls
    if clock == "graph":
        step_in = state_input("step", (), torch.int64, -1)
        prev_t_in = state_input("prev_t", (), torch.float32, float("-inf"))
    else:
        step_node = control_input("step", (), torch.int64, 0)
        t_node = control_input("t", (), torch.float32, 0.0)
    force_in = control_input("force", (len(regions),), torch.int8, -1)
    # context parallelism: each rank holds 1/k of a stream's tokens (k = 1: the whole stream,
    # replicated on every rank); ND and the decision sums are those of the whole sequence
    result.groups = collective_groups(gm)
    shards = token_shards(gm, result.groups) if result.groups else {}
    result.shards = [[shards.get(h, 1) for h in r.stream_inputs] for r in regions]
    result.dofs = [sum(_numel(tensor_meta(h)[0][1:]) * k for h, k in zip(r.stream_inputs, ks))
                   for r, ks in zip(regions, result.shards)]
    q_in = (control_input("q_ratio", (len(regions),), torch.float32, float("nan"))
            if result.dynamic and config.decision == "chi2" else None)  # the bound depends on the call's shape
    size_symbols = [p for p in placeholders if isinstance(node_value(p), torch.SymInt)
                    and getattr(node_value(p).node.expr, "is_Symbol", False)]
    ts = find_timestep(placeholders)
    result.timestep_input = ts.name if ts is not None else None
    if clock == "graph":
        step_node, t_node = insert_trajectory_step(graph, last_ph.next, ts, prev_t_in, step_in)
    new_state = [step_node, t_node] if clock == "graph" else []
    accum_outputs: list[fx.Node] = []
    trace: list[tuple[fx.Node, fx.Node, fx.Node]] = []
    min_step = max(1, config.warmup_steps)

    remap: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond getitems
    for k, region in enumerate(regions):
        region = BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                             [remap.get(n, n) for n in region.stream_inputs], region.stream_outputs,
                             [remap.get(n, n) for n in region.context_inputs], region.param_inputs)
        region, consts = scalar_constants(graph, region)
        name, tag = region.name, re.sub(r"\W", "_", region.name)
        metas = [tensor_meta(h) for h in region.stream_inputs]
        n = len(metas)
        # state of this block (StateSpec order = order of the new-state outputs below)
        a_in = [state_input(f"{name}.anchor_in.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
        a_res = [state_input(f"{name}.anchor_res.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
        consec = state_input(f"{name}.consecutive", (), torch.int64, 0)
        prev = ([state_input(f"{name}.previous_in.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
                if config.reference == "previous" else None)
        hist = hist_t = hist_n = est = last_err = None
        if approx == "taylor":  # residuals R_1 .. R_m of earlier full computations, their timesteps
            hist = [[state_input(f"{name}.res_hist.{s}.{j}", m[0], m[1], 0.0) for j in range(1, order + 1)]
                    for s, m in enumerate(metas)]
            hist_t = state_input(f"{name}.hist_t", (order + 1,), torch.float32, float("nan"))
            hist_n = state_input(f"{name}.hist_n", (), torch.int64, 0)
        if config.decision == "error":  # running estimate of e / delta, and the last measured e
            est = state_input(f"{name}.error_per_delta", (), torch.float32, float("nan"))
            last_err = state_input(f"{name}.error", (), torch.float32, float("nan"))
        maps: list[list[fx.Node]] = []  # per stream: weight, bias / u, v, bias (calibration.weight_shapes)
        ready, accs = None, []  # online: the ready flag, per stream ACCUM_KEYS accumulators
        if learned:
            for s, m in enumerate(metas):
                maps.append([add_input(f"{tag}_{key}{s}", _meta(shape), WeightSpec(
                    f"{name}.{key}.{s}", name, s, key, shape, torch.float32))
                    for key, shape in weight_shapes(m[0][-1], result.rank, nk).items()])
            if online:
                shape = (nk,) if nk > 1 else ()
                ready = add_input(f"{tag}_ready", _meta(shape), WeightSpec(f"{name}.ready", name, 0, "ready", shape,
                                                                           torch.float32))
                for s, m in enumerate(metas):
                    d = m[0][-1]
                    accs.append([add_input(f"{tag}_acc_{key}{s}", _meta(shape, torch.float64), AccumSpec(
                        f"{name}.{key}.{s}", name, s, key, shape, torch.float64))
                        for key, shape in zip(ACCUM_KEYS, ((nk,), (nk, d), (nk, d), (nk, d, d), (nk, d, d), (nk,)))])

        # ND: elements per sample over all streams decided together
        q = None
        if q_in is None and config.decision == "chi2":
            q = D.chi2_quantile_ratio(config.significance_level, result.dofs[k])
            result.thresholds.append(config.cache_ratio_threshold * q ** 0.5)
        else:  # symbolic ND (a per-call input), or the error rule (a per-block estimate)
            result.thresholds.append(None)

        # cond operands: streams, contexts, parameters, then the cache state the branches read
        operands = list(region.stream_inputs) + list(region.context_inputs) + list(region.param_inputs)

        def take(nodes: list[fx.Node]) -> list[int]:
            operands.extend(nodes)
            return list(range(len(operands) - len(nodes), len(operands)))

        slots = Slots(stream=list(range(n)), res=take(a_res), anchor_in=take(a_in))
        slots.maps = [take(group) for group in maps]
        if hist is not None:
            slots.history = [take(h) for h in hist]
            slots.hist_t, slots.hist_n = take([hist_t, hist_n])
        if hist is not None or (maps and (nk > 1 or online or result.rank is not None)):
            slots.t = take([t_node])[0]
        if ready is not None:
            slots.ready = take([ready])[0]
        # the size symbols themselves, so that the lowered branches can bind every symbol their
        # inputs' sizes use (Inductor codegens a subgraph from its own inputs only)
        take([p for p in size_symbols if p not in operands])

        # streams split over different numbers of ranks (the text replicated, the image sharded):
        # each stream's local sums are scaled by its count k before the all-reduce, so that every
        # stream enters the whole-sequence sums once (see decision.block_decision)
        weights = tuple(result.shards[k]) if len(set(result.shards[k])) > 1 else None
        full_gm = full_branch(region, operands, slots, approx, config, learn=approx if online else None, consts=consts,
                              stream_weights=weights)
        gm.add_submodule(f"fc_{tag}_full", full_gm)
        gm.add_submodule(f"fc_{tag}_approx", approx_branch(region, operands, slots, approx, config, online))

        members = set(region.nodes)
        cur = _Cursor(graph, region.nodes[-1])
        # cond operands must be contiguous with a layout Inductor keeps (a non-contiguous one gave
        # wrong results under AOTInductor, and the branches assert the strides they were traced
        # with; see decision.fixed_contiguous); a graph input keeps its own (fixed) layout
        contig = {op: cur.call(D.fixed_contiguous, op, val=_contiguous_meta(node_value(op)))
                  for op in dict.fromkeys(region.stream_inputs + region.context_inputs)
                  if tensor_meta(op) is not None and op.op != "placeholder"}
        operands = [contig.get(o, o) for o in operands]
        streams = [contig.get(h, h) for h in region.stream_inputs]

        kw = dict(q_ratio=q, tau=config.cache_ratio_threshold, beta=config.adaptive_beta,
                  timestep_max=config.timestep_max, min_step=min_step,
                  max_consecutive=config.max_consecutive_approx, enabled=config.enable_block_approx,
                  groups=tuple(result.groups), stream_weights=weights)
        if q_in is not None:
            kw["q_ratio"] = cur.get(q_in, k, val=_meta())
        if hist is not None:
            kw["history_ok"] = cur.call(F.history_finite, hist, val=_meta((), torch.bool))
        if est is not None:
            kw.update(error_per_delta=est, error_budget=config.error_budget)
        kw["force"] = cur.get(force_in, k, val=_meta((), torch.int8))
        dec = cur.call(D.block_decision, streams, prev if prev is not None else a_in, step_node, consec, t_node, **kw)
        ok, delta, thr = cur.unpack(dec, 3)
        with graph.inserting_after(cur.node):
            attr_t = graph.get_attr(f"fc_{tag}_approx")
        with graph.inserting_after(attr_t):
            attr_f = graph.get_attr(f"fc_{tag}_full")
        cur.node = attr_f
        cond = cur.call(torch.ops.higher_order.cond, ok, attr_t, attr_f, tuple(operands))
        outs = []
        for s, o in enumerate(region.stream_outputs):
            if symbolic(node_value(o).shape):  # returned flat (branches.flat_if_symbolic)
                cur.get(cond, s, val=fake_flat(node_value(o)))
                outs.append(cur.method("view_as", cur.node, streams[s], val=node_value(o)))
            else:
                outs.append(cur.get(cond, s, val=node_value(o)))
        extra = n  # cond outputs after the streams
        if est is not None:
            err2, ref2 = (cur.get(cond, extra + j) for j in range(2))
            extra += 2
        if online:
            learn = cur.call(D.learn_mask, ok, streams, outs, step_node, approx)
            for s in range(n):
                incs = [cur.get(cond, extra + s * len(ACCUM_KEYS) + j,
                                val=_meta(node_value(acc).shape[1:])) for j, acc in enumerate(accs[s])]
                acc_new = cur.call(D.accumulate, accs[s], incs, learn, t_node, nk, config.timestep_max)
                accum_outputs += cur.unpack(acc_new, len(ACCUM_KEYS))
        # new state, in StateSpec order
        new_in, new_res, new_consec = cur.unpack(cur.call(D.update_state, ok, streams, outs, a_in, a_res, consec), 3)
        new_state += [cur.get(new_in, s) for s in range(n)] + [cur.get(new_res, s) for s in range(n)] + [new_consec]
        if prev is not None:
            new_state += cur.unpack(cur.call(D.update_previous, streams, prev), n)
        if hist is not None:
            new_hist, new_t, new_n = cur.unpack(cur.call(F.update_history, ok, streams, outs, a_res, hist, hist_t,
                                                         hist_n, step_node, t_node, order=order), 3)
            new_state += [cur.get(cur.get(new_hist, s), j) for s in range(n) for j in range(order)] + [new_t, new_n]
        if est is not None:
            new_state += cur.unpack(cur.call(F.update_error_estimate, ok, err2, ref2, delta, step_node, est, last_err,
                                             groups=tuple(result.groups)), 2)
        trace.append((delta, thr, ok))

        for o, gi in zip(region.stream_outputs, outs):
            o.replace_all_uses_with(gi, delete_user_cb=lambda u: u not in members)
            remap[o] = gi
        for node in reversed(region.nodes):
            graph.erase_node(node)

    with graph.inserting_before(out_node):
        stacked = tuple(graph.call_function(torch.stack, ([t[i] for t in trace],)) for i in range(3))
    # the user outputs as they are now: in a block graph (regional) they were the block's outputs
    user_outs = list(out_node.args[0]) if is_tuple else [out_node.args[0]]
    out_node.args = (tuple(user_outs) + tuple(new_state) + stacked + tuple(accum_outputs),)
    try:
        graph.lint()
    except Exception:
        from torch.fx.passes.tools_common import legalize_graph

        legalize_graph(gm)
        gm.graph.lint()
    gm.recompile()
    return gm, result
