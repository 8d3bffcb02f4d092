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
from .blocks import (BlockRegion, clone_graph_module, collective_groups, find_blocks, find_timestep, graph_io, insert_placeholder, node_value,
                     remap_region, tensor_meta)


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


ACCUM_KEYS = ("n", "sx", "sy", "xtx", "xty", "yty")


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
    dofs: list = field(default_factory=list)  # ND per block: int, or SymInt in a dynamic-shape graph
    groups: list[str] = field(default_factory=list)  # process groups the decision sums are all-reduced over

    @property
    def dynamic(self) -> bool:
        """The graph has symbolic shapes: state shapes and ``q_ratio`` depend on the call."""
        return any(isinstance(d, torch.SymInt) for d in self.dofs)


def _set_val(node: fx.Node, val) -> fx.Node:
    node.meta["val"] = val
    node.meta["example_value"] = val
    return node


_OPERAND_SCALARS = (int, torch.SymInt)  # what cond accepts besides tensors


def _scalar_constants(graph: fx.Graph, region: BlockRegion) -> tuple[BlockRegion, dict[fx.Node, object]]:
    """cond operands may be tensors, ints and SymInts only. ``dynamic=True`` turns float
    attributes (a norm's eps, a dropout p) into 0-d tensor inputs read by ``.item()`` (SymFloats),
    and ``.item()`` inside a branch is data-dependent. Such a scalar context input is baked into
    the branch as the value Dynamo traced it with, and the outer graph asserts at run time that
    the input still has that value (``torch._check``: a different value fails loudly, never
    silently). Edits ``graph`` (the asserts).

    Returns:
        (the region without those context inputs, {node: value to use in the full branch}).
    """
    consts: dict[fx.Node, object] = {}
    context = []
    for c in region.context_inputs:
        v = node_value(c)
        if v is None or isinstance(v, (torch.Tensor,) + _OPERAND_SCALARS):
            context.append(c)
            continue
        expr = v.node.expr if isinstance(v, (torch.SymFloat, torch.SymBool)) else None
        value = type(v.node.hint)(v.node.hint) if expr is not None else v
        if value is None:
            raise ValueError(f"{region.name}: context input {c.name} is a scalar without a value to bake")
        consts[c] = float(value) if isinstance(v, torch.SymFloat) else value
        if expr is not None and not expr.is_number:
            with graph.inserting_after(c):
                eq = _set_val(graph.call_function(operator.eq, (c, consts[c])), v == consts[c])
            with graph.inserting_after(eq):
                graph.call_function(torch._check, (eq,))
    return BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                       region.stream_inputs, region.stream_outputs, context, region.param_inputs), consts


def _extract_full_branch(region: BlockRegion, operands: list[fx.Node], slots: dict | None = None,
                         learn: str | None = None, consts: dict | None = None) -> fx.GraphModule:
    """The block's own nodes as a GraphModule over ``operands`` (extra operands unused). With
    ``learn`` (online calibration: the approximation kind) the branch also returns the ridge
    statistic increments of each stream (``decision.ridge_increments``) after the outputs."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    ph = []
    for i, op in enumerate(operands):
        env[op] = _set_val(g.placeholder(f"arg{i}_{op.name}"), node_value(op))
        ph.append(env[op])
    env.update(consts or {})
    for n in region.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    outs = []
    for o in region.stream_outputs:
        # a copy, not .contiguous(): a slice that is already contiguous (Flux's single block at
        # batch 1 returns two slices of one buffer) would be returned as a view, and cond refuses
        # branch outputs that alias each other or an input
        outs.append(_set_val(g.call_function(torch.clone, (env[o],), {"memory_format": torch.contiguous_format}),
                             node_value(o)))
    ys = list(outs)
    outs = [_flat_if_symbolic(g, y) for y in ys]
    if learn is not None:
        for s in range(len(region.stream_outputs)):
            inc = g.call_function(D.ridge_increments, (ph[slots["stream"][s]], ys[s], ph[slots["in"][s]],
                                                       ph[slots["res"][s]]), {"kind": learn})
            outs += [g.call_function(operator.getitem, (inc, j)) for j in range(len(ACCUM_KEYS))]
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _symbolic(shape) -> bool:
    return any(isinstance(d, torch.SymInt) for d in shape)


def _flat_if_symbolic(g: fx.Graph, y: fx.Node) -> fx.Node:
    """A branch output with symbolic sizes is returned flat ([B N D]): cond rebuilds its output's
    strides from the two branches' and refuses the ``Max(1, N)`` that contiguous strides of a
    symbolic size carry; the outer graph views it back (``view_as`` the stream input)."""
    v = node_value(y)
    if not _symbolic(v.shape):
        return y
    return _set_val(g.call_method("reshape", (y, -1)), _fake_flat(v))


def _fake_flat(v: torch.Tensor) -> torch.Tensor:
    with v.fake_mode:
        return v.reshape(-1)


def _approx_branch(region: BlockRegion, operands: list[fx.Node], slots: dict, approx: str,
                   config: FastCacheConfig, online: bool) -> fx.GraphModule:
    """Approximation of the block's outputs from its stream inputs and the cached state (and,
    online, zero statistic increments in place of the full branch's)."""
    g = fx.Graph()
    ph = [_set_val(g.placeholder(f"arg{i}_{op.name}"), node_value(op)) for i, op in enumerate(operands)]
    outs = []
    for s, o in enumerate(region.stream_outputs):
        h = ph[slots["stream"][s]]
        if approx == "residual":
            y = g.call_function(D.approx_residual, (h, ph[slots["res"][s]]))
        elif approx == "linear" and config.rank is None and config.time_buckets == 1 and not online:
            y = g.call_function(D.approx_linear, (h, ph[slots["maps"][s][0]], ph[slots["maps"][s][1]]))
        else:
            ready = ph[slots["ready"]] if online else None
            y = g.call_function(D.approx_map, (h, ph[slots["res"][s]], ph[slots["in"][s]],
                                               [ph[i] for i in slots["maps"][s]], ph[slots["t"]], ready),
                                {"kind": approx, "rank": config.rank, "buckets": config.time_buckets,
                                 "timestep_max": config.timestep_max})
        outs.append(_flat_if_symbolic(g, _set_val(y, node_value(o))))
    if online:
        for s in range(len(region.stream_outputs)):
            z = g.call_function(D.zero_increments, (ph[slots["stream"][s]],))
            outs += [g.call_function(operator.getitem, (z, j)) for j in range(len(ACCUM_KEYS))]
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def _numel(shape) -> int | torch.SymInt:
    n = 1
    for d in shape:
        n = n * d
    return n


def _placeholder_value(shape, dtype: torch.dtype, placeholders: list[fx.Node]) -> torch.Tensor:
    """The ``meta["val"]`` of a new state input: a meta tensor, or, for a symbolic shape, a fake
    tensor of the graph's own fake mode (its SymInts belong to that mode's ShapeEnv)."""
    if not any(isinstance(d, torch.SymInt) for d in shape):
        return torch.empty(shape, dtype=dtype, device="meta")
    vals = [node_value(p) for p in placeholders]
    mode = next(v.fake_mode for v in vals if hasattr(v, "fake_mode"))
    device = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
    with mode:
        return torch.empty(shape, dtype=dtype, device=device)


def insert_trajectory_step(graph: fx.Graph, before: fx.Node, timestep: fx.Node | None, prev_t: fx.Node,
                           step: fx.Node) -> tuple[fx.Node, fx.Node]:
    """Insert ``runtime.decision.trajectory_step`` before ``before``: (step [] int64, t [] float32)
    nodes, with ``meta["val"]`` set. Every pass that keeps per-trajectory state counts steps so."""
    with graph.inserting_before(before):
        traj = graph.call_function(D.trajectory_step, (timestep, prev_t, step))
        step_node = _set_val(graph.call_function(operator.getitem, (traj, 0)),
                             torch.empty((), dtype=torch.int64, device="meta"))
        t_node = _set_val(graph.call_function(operator.getitem, (traj, 1)),
                          torch.empty((), dtype=torch.float32, device="meta"))
    return step_node, t_node


def apply_block_cache(gm: fx.GraphModule, config: FastCacheConfig, regions: list[BlockRegion] | None = None,
                      *, approx: str | None = None, clock: str = "graph") -> tuple[fx.GraphModule, BlockCacheResult]:
    """Rewrite a copy of ``gm`` so each block region becomes a guarded ``torch.cond``.

    Args:
        gm: a Dynamo graph (parameters as placeholders).
        config: thresholds, warmup, approximation kind.
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
    """
    search = find_blocks(gm) if regions is None else None
    regions = search.regions if regions is None else regions
    gm, val_map = clone_graph_module(gm)
    regions = [remap_region(r, val_map) for r in regions]
    approx = approx or config.approx
    graph = gm.graph
    placeholders, out_node, orig_outs, is_tuple = graph_io(graph)
    result = BlockCacheResult(
        blocks=[r.name for r in regions], stream_shapes=[r.stream_shapes for r in regions], thresholds=[],
        num_user_inputs=len(placeholders), num_user_outputs=len(orig_outs), output_is_tuple=is_tuple,
        left_alone=list(search.left_alone) if search else [], approx=approx,
        rank=config.rank if approx != "residual" else None,
        time_buckets=config.time_buckets if approx != "residual" else 1,
        online=approx != "residual" and config.calibration == "online",
    )
    online = result.online
    nk = result.time_buckets
    if not regions:
        return gm, result

    last_ph = placeholders[-1]
    new_inputs: list[fx.Node] = []

    def add_input(name: str, val, spec) -> fx.Node:
        nonlocal last_ph
        p = last_ph = insert_placeholder(graph, last_ph, name, val)
        new_inputs.append(p)
        if isinstance(spec, StateSpec):
            result.state.append(spec)
        elif isinstance(spec, ControlSpec):
            result.controls.append(spec)
        elif isinstance(spec, AccumSpec):
            result.accums.append(spec)
        else:
            result.weights.append(spec)
        result.extra_inputs.append(spec)
        return p

    def state_input(name: str, like_shape, dtype, fill: float) -> fx.Node:
        val = _placeholder_value(like_shape, dtype, placeholders)
        return add_input("fc_" + re.sub(r"\W", "_", name), val, StateSpec(name, tuple(like_shape), dtype, fill))

    def safe(name: str) -> str:
        return re.sub(r"\W", "_", name)

    # trajectory state
    if clock not in ("graph", "input"):
        raise ValueError(f"clock: expected 'graph' or 'input', got {clock!r}")
    if clock == "graph":
        step_in = state_input("step", (), torch.int64, -1)
        prev_t_in = state_input("prev_t", (), torch.float32, float("-inf"))
    else:
        step_node = add_input("fc_step", torch.empty((), dtype=torch.int64, device="meta"),
                              ControlSpec("step", (), torch.int64, 0))
        t_node = add_input("fc_t", torch.empty((), dtype=torch.float32, device="meta"),
                           ControlSpec("t", (), torch.float32, 0.0))
    force_in = add_input("fc_force", torch.empty((len(regions),), dtype=torch.int8, device="meta"),
                         ControlSpec("force", (len(regions),), torch.int8, -1))
    dofs = [sum(_numel(tensor_meta(h)[0][1:]) for h in r.stream_inputs) for r in regions]
    q_in = None
    if any(isinstance(d, torch.SymInt) for d in dofs):  # the bound depends on the call's shape
        q_in = add_input("fc_q_ratio", torch.empty((len(regions),), dtype=torch.float32, device="meta"),
                         ControlSpec("q_ratio", (len(regions),), torch.float32, float("nan")))
    result.dofs = dofs
    result.groups = collective_groups(gm)
    size_symbols = [p for p in placeholders if isinstance(node_value(p), torch.SymInt)
                    and getattr(node_value(p).node.expr, "is_Symbol", False)]
    ts = find_timestep(placeholders)
    result.timestep_input = ts.name if ts is not None else None
    if clock == "graph":
        step_node, t_node = insert_trajectory_step(graph, last_ph.next, ts, prev_t_in, step_in)
    accum_outputs: list[fx.Node] = []
    new_state_outputs = [step_node, t_node] if clock == "graph" else []
    trace_delta, trace_thr, trace_ok = [], [], []
    min_step = max(1, config.warmup_steps)

    remap: dict[fx.Node, fx.Node] = {}  # outputs of rewritten regions -> their cond getitems
    for k, region in enumerate(regions):
        region = BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                             [remap.get(n, n) for n in region.stream_inputs], region.stream_outputs,
                             [remap.get(n, n) for n in region.context_inputs], region.param_inputs)
        region, consts = _scalar_constants(graph, region)
        tag = safe(region.name)
        metas = [tensor_meta(h) for h in region.stream_inputs]
        a_in = [state_input(f"{region.name}.anchor_in.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
        a_res = [state_input(f"{region.name}.anchor_res.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
        consec = state_input(f"{region.name}.consecutive", (), torch.int64, 0)
        prev = ([state_input(f"{region.name}.previous_in.{s}", m[0], m[1], 0.0) for s, m in enumerate(metas)]
                if config.reference == "previous" else None)
        maps: list[list[fx.Node]] = []  # per stream: weight, bias / u, v, bias (calibration.weight_shapes)
        ready: list[fx.Node] = []
        accs: list[list[fx.Node]] = []  # per stream: ACCUM_KEYS
        if approx in ("linear", "residual_linear"):
            for s, m in enumerate(metas):
                d = m[0][-1]
                maps.append([])
                for key, shape in weight_shapes(d, result.rank, nk).items():
                    val = torch.empty(shape, dtype=torch.float32, device="meta")
                    maps[-1].append(add_input(f"fc_{tag}_{key}{s}", val, WeightSpec(
                        f"{region.name}.{key}.{s}", region.name, s, key, shape, torch.float32)))
            if online:
                shape = (nk,) if nk > 1 else ()
                ready.append(add_input(f"fc_{tag}_ready", torch.empty(shape, dtype=torch.float32, device="meta"),
                                       WeightSpec(f"{region.name}.ready", region.name, 0, "ready", shape, torch.float32)))
                for s, m in enumerate(metas):
                    d = m[0][-1]
                    accs.append([])
                    for key, shape in zip(ACCUM_KEYS, ((nk,), (nk, d), (nk, d), (nk, d, d), (nk, d, d), (nk,))):
                        spec = AccumSpec(f"{region.name}.{key}.{s}", region.name, s, key, shape, torch.float64)
                        accs[-1].append(add_input(f"fc_{tag}_acc_{key}{s}", torch.empty(shape, dtype=torch.float64,
                                                                                        device="meta"), spec))

        # ND: elements per sample over all streams decided together
        if q_in is None:
            q = D.chi2_quantile_ratio(config.significance_level, dofs[k])
            result.thresholds.append(config.cache_ratio_threshold * q ** 0.5)
        else:
            q = None  # a per-call input, read below
            result.thresholds.append(None)

        operands = list(region.stream_inputs) + list(region.context_inputs) + list(region.param_inputs)
        slots = {"stream": list(range(len(region.stream_inputs)))}
        base = len(operands)
        operands += a_res + a_in
        n = len(metas)
        slots["res"] = list(range(base, base + n))
        slots["in"] = list(range(base + n, base + 2 * n))
        slots["maps"] = []
        for group in maps:
            slots["maps"].append(list(range(len(operands), len(operands) + len(group))))
            operands += group
        if maps and (nk > 1 or online or result.rank is not None):
            slots["t"] = len(operands)
            operands.append(t_node)
        if ready:
            slots["ready"] = len(operands)
            operands += ready
        # the size symbols themselves, so that the lowered branches can bind every symbol their
        # inputs' sizes use (Inductor codegens a subgraph from its own inputs only)
        operands += [p for p in size_symbols if p not in operands]

        full_gm = _extract_full_branch(region, operands, slots, learn=approx if online else None, consts=consts)
        approx_gm = _approx_branch(region, operands, slots, approx, config, online)
        gm.add_submodule(f"fc_{tag}_full", full_gm)
        gm.add_submodule(f"fc_{tag}_approx", approx_gm)

        members = set(region.nodes)
        last = region.nodes[-1]
        # cond operands must be contiguous (a non-contiguous one gave wrong results under
        # AOTInductor, and Inductor asserts the strides it traced with)
        contig = {}
        for op in dict.fromkeys(region.stream_inputs + region.context_inputs):
            # a graph input keeps its own (fixed) layout: Inductor lowered .contiguous() of a
            # transposed input (DiT's patch embedding output, a block graph's input) to a copy
            # with the input's strides, which the branch, traced contiguous, then rejected
            if tensor_meta(op) is None or op.op == "placeholder":
                continue
            with graph.inserting_after(last):
                c = graph.call_method("contiguous", (op,))
            _set_val(c, node_value(op))
            contig[op] = c
            last = c
        operands = [contig.get(o, o) for o in operands]
        region = BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                             [contig.get(n, n) for n in region.stream_inputs], region.stream_outputs,
                             [contig.get(n, n) for n in region.context_inputs], region.param_inputs)
        refs = prev if prev is not None else a_in
        kw = dict(q_ratio=q, tau=config.cache_ratio_threshold, beta=config.adaptive_beta,
                  timestep_max=config.timestep_max, min_step=min_step,
                  max_consecutive=config.max_consecutive_approx, enabled=config.enable_block_approx,
                  groups=tuple(result.groups))
        if q_in is not None:
            with graph.inserting_after(last):
                q = last = _set_val(graph.call_function(operator.getitem, (q_in, k)),
                                    torch.empty((), dtype=torch.float32, device="meta"))
            kw["q_ratio"] = q
        with graph.inserting_after(last):
            force_k = graph.call_function(operator.getitem, (force_in, k))
        _set_val(force_k, torch.empty((), dtype=torch.int8, device="meta"))
        with graph.inserting_after(force_k):
            dec = graph.call_function(D.block_decision, (list(region.stream_inputs), refs, step_node, consec, t_node),
                                      {**kw, "force": force_k})
        with graph.inserting_after(dec):
            ok = graph.call_function(operator.getitem, (dec, 0))
        with graph.inserting_after(ok):
            delta = graph.call_function(operator.getitem, (dec, 1))
        with graph.inserting_after(delta):
            thr = graph.call_function(operator.getitem, (dec, 2))
        with graph.inserting_after(thr):
            attr_t = graph.get_attr(f"fc_{tag}_approx")
        with graph.inserting_after(attr_t):
            attr_f = graph.get_attr(f"fc_{tag}_full")
        with graph.inserting_after(attr_f):
            cond = graph.call_function(torch.ops.higher_order.cond, (ok, attr_t, attr_f, tuple(operands)))
        prev_node = cond
        outs = []
        for s, o in enumerate(region.stream_outputs):
            with graph.inserting_after(prev_node):
                gi = graph.call_function(operator.getitem, (cond, s))
            if _symbolic(node_value(o).shape):  # returned flat (_flat_if_symbolic)
                _set_val(gi, _fake_flat(node_value(o)))
                with graph.inserting_after(gi):
                    gi = graph.call_method("view_as", (gi, region.stream_inputs[s]))
            _set_val(gi, node_value(o))
            outs.append(gi)
            prev_node = gi
        if online:
            incs = []
            for s in range(n):
                incs.append([])
                for j, acc in enumerate(accs[s]):
                    with graph.inserting_after(prev_node):
                        prev_node = graph.call_function(operator.getitem, (cond, n + s * len(ACCUM_KEYS) + j))
                    _set_val(prev_node, torch.empty(node_value(acc).shape[1:], dtype=torch.float32, device="meta"))
                    incs[-1].append(prev_node)
            with graph.inserting_after(prev_node):
                prev_node = graph.call_function(D.learn_mask, (ok, list(region.stream_inputs), outs, step_node, approx))
            learn = prev_node
            for s in range(n):
                with graph.inserting_after(prev_node):
                    prev_node = graph.call_function(D.accumulate, (accs[s], incs[s], learn, t_node, nk,
                                                                   config.timestep_max))
                acc_new = prev_node
                for j in range(len(ACCUM_KEYS)):
                    with graph.inserting_after(prev_node):
                        prev_node = graph.call_function(operator.getitem, (acc_new, j))
                    accum_outputs.append(prev_node)
        with graph.inserting_after(prev_node):
            upd = graph.call_function(D.update_state, (ok, list(region.stream_inputs), outs, a_in, a_res, consec))
        prev_node = upd
        new_state = []
        for i in range(3):
            with graph.inserting_after(prev_node):
                prev_node = graph.call_function(operator.getitem, (upd, i))
            new_state.append(prev_node)
        flat = []
        for i, group in enumerate(new_state[:2]):
            for s in range(n):
                with graph.inserting_after(prev_node):
                    prev_node = graph.call_function(operator.getitem, (group, s))
                flat.append(prev_node)
        new_state_outputs += flat + [new_state[2]]
        if prev is not None:
            with graph.inserting_after(prev_node):
                up = graph.call_function(D.update_previous, (list(region.stream_inputs), prev))
            prev_node = up
            for s in range(n):
                with graph.inserting_after(prev_node):
                    prev_node = graph.call_function(operator.getitem, (up, s))
                new_state_outputs.append(prev_node)
        trace_delta.append(delta)
        trace_thr.append(thr)
        trace_ok.append(ok)

        for o, gi in zip(region.stream_outputs, outs):
            o.replace_all_uses_with(gi, delete_user_cb=lambda u: u not in members)
            remap[o] = gi
        for node in reversed(region.nodes):
            graph.erase_node(node)

    with graph.inserting_before(out_node):
        td = graph.call_function(torch.stack, (trace_delta,))
        tt = graph.call_function(torch.stack, (trace_thr,))
        tk = graph.call_function(torch.stack, (trace_ok,))
    # the user outputs as they are now: in a block graph (regional) they were the block's outputs
    user_outs = list(out_node.args[0]) if is_tuple else [out_node.args[0]]
    out_node.args = (tuple(user_outs) + tuple(new_state_outputs) + (td, tt, tk) + tuple(accum_outputs),)
    try:
        graph.lint()
    except Exception:
        from torch.fx.passes.tools_common import legalize_graph

        legalize_graph(gm)
        gm.graph.lint()
    gm.recompile()
    return gm, result
