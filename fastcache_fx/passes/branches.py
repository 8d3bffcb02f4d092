"""The two branches of a block's ``torch.cond``, built as GraphModules over the cond operands.

``full_branch``: the block's own nodes (plus, with ``decision="error"``, the error the
approximation would have made, and with online calibration the ridge statistic increments).
``approx_branch``: the approximation from the stream inputs and the cached state (plus zeros
in place of the full branch's extra outputs). Both return the same number of outputs with the
same shapes, as cond requires. ``Slots`` says where each operand sits.

Branch output layout: one [B, N, D] output per stream (flat [B N D] when the shape is symbolic,
see ``flat_if_symbolic``), then, with ``decision="error"``, (err2 [B], ref2 [B]), then, online,
``ACCUM_KEYS`` increments per stream.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import FastCacheConfig
from ..runtime import decision as D
from ..runtime import forecast as F
from .blocks import BlockRegion, node_value

ACCUM_KEYS = ("n", "sx", "sy", "xtx", "xty", "yty")
_OPERAND_SCALARS = (int, torch.SymInt)  # what cond accepts besides tensors


@dataclass
class Slots:
    """Positions of the operands in the cond's operand list, per stream where a list."""

    stream: list[int]
    res: list[int]
    anchor_in: list[int]
    maps: list[list[int]] = field(default_factory=list)  # calibrated map tensors per stream
    history: list[list[int]] = field(default_factory=list)  # taylor: R_1 .. R_m per stream
    hist_t: int | None = None
    hist_n: int | None = None
    t: int | None = None
    ready: int | None = None


def set_val(node: fx.Node, val) -> fx.Node:
    """Set the example value of a node a pass created (``meta["val"]``, Dynamo's ``example_value``)."""
    node.meta["val"] = val
    node.meta["example_value"] = val
    return node


def symbolic(shape) -> bool:
    return any(isinstance(d, torch.SymInt) for d in shape)


def fake_flat(v: torch.Tensor) -> torch.Tensor:
    """The example value of ``v.reshape(-1)`` (v a fake tensor)."""
    with v.fake_mode:
        return v.reshape(-1)


def flat_if_symbolic(g: fx.Graph, y: fx.Node) -> fx.Node:
    """A branch output with symbolic sizes is returned flat ([B N D]): cond rebuilds its output's
    strides from the two branches' and refuses the ``Max(1, N)`` that contiguous strides of a
    symbolic size carry; the outer graph views it back (``view_as`` the stream input)."""
    v = node_value(y)
    if not symbolic(v.shape):
        return y
    return set_val(g.call_method("reshape", (y, -1)), fake_flat(v))


def scalar_constants(graph: fx.Graph, region: BlockRegion) -> tuple[BlockRegion, dict[fx.Node, object]]:
    """cond operands may be tensors, ints and SymInts only. ``dynamic=True`` turns float
    attributes (a norm's eps, a dropout p) into 0-d tensor inputs read by ``.item()`` (SymFloats),
    and ``.item()`` inside a branch is data-dependent. Such a scalar context input is baked into
    the branch as the value Dynamo traced it with, and the outer graph asserts at run time that
    the input still has that value (``torch._check``: a different value fails loudly, never
    silently). Edits ``graph`` (the asserts).

    Returns:
        (the region without those context inputs, {node: value to use in the full branch}).

    Raises:
        ValueError: a scalar input without a value to bake.
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
                eq = set_val(graph.call_function(operator.eq, (c, consts[c])), v == consts[c])
            with graph.inserting_after(eq):
                graph.call_function(torch._check, (eq,))
    return BlockRegion(region.name, region.list_name, region.index, region.module_type, region.nodes,
                       region.stream_inputs, region.stream_outputs, context, region.param_inputs), consts


def _approximation(g: fx.Graph, ph: list[fx.Node], slots: Slots, s: int, approx: str, config: FastCacheConfig,
                   online: bool) -> fx.Node:
    """The node computing the approximated output of stream ``s`` (``runtime.decision`` /
    ``runtime.forecast`` functions)."""
    h = ph[slots.stream[s]]
    if approx == "residual":
        return g.call_function(D.approx_residual, (h, ph[slots.res[s]]))
    if approx == "taylor":
        residuals = [ph[slots.res[s]]] + [ph[i] for i in slots.history[s]]
        return g.call_function(F.approx_taylor, (h, residuals, ph[slots.hist_t], ph[slots.hist_n], ph[slots.t]),
                               {"order": config.taylor_order})
    if approx == "linear" and config.rank is None and config.time_buckets == 1 and not online:
        return g.call_function(D.approx_linear, (h, ph[slots.maps[s][0]], ph[slots.maps[s][1]]))
    ready = ph[slots.ready] if online else None
    return g.call_function(D.approx_map, (h, ph[slots.res[s]], ph[slots.anchor_in[s]], [ph[i] for i in slots.maps[s]],
                                          ph[slots.t], ready),
                           {"kind": approx, "rank": config.rank, "buckets": config.time_buckets,
                            "timestep_max": config.timestep_max})


def _placeholders(g: fx.Graph, operands: list[fx.Node]) -> list[fx.Node]:
    return [set_val(g.placeholder(f"arg{i}_{op.name}"), node_value(op)) for i, op in enumerate(operands)]


def full_branch(region: BlockRegion, operands: list[fx.Node], slots: Slots, approx: str, config: FastCacheConfig,
                *, learn: str | None = None, consts: dict | None = None,
                stream_weights: tuple[int, ...] | None = None) -> fx.GraphModule:
    """The block's own nodes as a GraphModule over ``operands`` (extra operands unused).

    With ``config.decision == "error"`` it also returns ``forecast.error_sums`` of the
    approximation against the true outputs (each output stream's sums times its entry of
    ``stream_weights`` when given: context parallelism, ``decision.block_decision``); with ``learn`` (online calibration: the kind) the
    ridge statistic increments of each stream (``decision.ridge_increments``)."""
    g = fx.Graph()
    ph = _placeholders(g, operands)
    env: dict[fx.Node, object] = dict(zip(operands, ph))
    env.update(consts or {})
    for n in region.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    ys = []
    for o in region.stream_outputs:
        # a copy, not .contiguous(): a slice that is already contiguous (Flux's single block at
        # batch 1 returns two slices of one buffer) would be returned as a view, and cond refuses
        # branch outputs that alias each other or an input
        ys.append(set_val(g.call_function(torch.clone, (env[o],), {"memory_format": torch.contiguous_format}),
                          node_value(o)))
    outs = [flat_if_symbolic(g, y) for y in ys]
    if config.decision == "error":
        y_hat = [_approximation(g, ph, slots, s, approx, config, learn is not None) for s in range(len(ys))]
        sums = g.call_function(F.error_sums, (y_hat, ys), {"weights": stream_weights})
        outs += [g.call_function(operator.getitem, (sums, j)) for j in range(2)]
    if learn is not None:
        for s in range(len(region.stream_outputs)):
            inc = g.call_function(D.ridge_increments, (ph[slots.stream[s]], ys[s], ph[slots.anchor_in[s]],
                                                       ph[slots.res[s]]), {"kind": learn})
            outs += [g.call_function(operator.getitem, (inc, j)) for j in range(len(ACCUM_KEYS))]
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def approx_branch(region: BlockRegion, operands: list[fx.Node], slots: Slots, approx: str, config: FastCacheConfig,
                  online: bool) -> fx.GraphModule:
    """Approximation of the block's outputs from its stream inputs and the cached state (zeros
    in place of the full branch's error sums and statistic increments)."""
    g = fx.Graph()
    ph = _placeholders(g, operands)
    outs = []
    for s, o in enumerate(region.stream_outputs):
        y = _approximation(g, ph, slots, s, approx, config, online)
        outs.append(flat_if_symbolic(g, set_val(y, node_value(o))))
    if config.decision == "error":
        z = g.call_function(F.zero_error_sums, (ph[slots.stream[0]],))
        outs += [g.call_function(operator.getitem, (z, j)) for j in range(2)]
    if online:
        for s in range(len(region.stream_outputs)):
            z = g.call_function(D.zero_increments, (ph[slots.stream[s]],))
            outs += [g.call_function(operator.getitem, (z, j)) for j in range(len(ACCUM_KEYS))]
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)
