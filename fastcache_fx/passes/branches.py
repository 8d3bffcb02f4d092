"""The two branches of a block's ``torch.cond``, built as GraphModules over the cond operands.

``full_branch``: the block's own nodes (plus, with ``decision="error"`` or ``"output"``, the error
the approximation would have made, and with online calibration the ridge statistic increments).
``approx_branch``: the approximation from the stream inputs and the cached state (plus zeros
in place of the full branch's extra outputs). Both return the same number of outputs with the
same shapes, as cond requires. ``Slots`` says where each operand sits.

Branch output layout: one [B, N, D] output per stream (flat [B N D] when the shape is symbolic,
see ``flat_if_symbolic``), then, with ``decision="error"`` or ``"output"``, (err2 [B], ref2 [B]),
then for the last block under ``"output"`` the error Y_hat - Y per stream, then the
approximation kind's extras (``Approximation.full_extras``: online, the ridge statistic
increments per stream). What the approximation computes is the kind's (``fastcache_fx.approx``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..approx import Approximation, Slots
from ..config import FastCacheConfig
from ..ops import forecast
from .blocks import BlockRegion
from .graph_utils import node_value
from .extra_io import set_val, symbolic

_OPERAND_SCALARS = (int, torch.SymInt)  # what cond accepts besides tensors


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


def _placeholders(g: fx.Graph, operands: list[fx.Node]) -> list[fx.Node]:
    return [set_val(g.placeholder(f"arg{i}_{op.name}"), node_value(op)) for i, op in enumerate(operands)]


def full_branch(region: BlockRegion, operands: list[fx.Node], slots: Slots, kind: Approximation,
                config: FastCacheConfig, *, consts: dict | None = None,
                stream_weights: tuple[int, ...] | None = None, return_error: bool = False) -> fx.GraphModule:
    """The block's own nodes as a GraphModule over ``operands`` (extra operands unused).

    With ``config.measures_error`` it also returns ``forecast.error_sums`` of the
    approximation against the true outputs (each output stream's sums times its entry of
    ``stream_weights`` when given: context parallelism, ``decision.block_decision``), then with
    ``return_error`` (the last block under ``decision="output"``) the error Y_hat - Y of each
    stream (its shape), then the kind's ``full_extras`` (online calibration: the ridge statistic
    increments per stream)."""
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
    if config.measures_error:
        y_hat = [kind.node(g, ph, slots, s, config) for s in range(len(ys))]
        sums = g.call_function(forecast.error_sums, (y_hat, ys), {"weights": stream_weights})
        outs += [g.call_function(operator.getitem, (sums, j)) for j in range(2)]
        if return_error:
            outs += [flat_if_symbolic(g, set_val(g.call_function(torch.sub, (a, y)), node_value(o)))
                     for a, y, o in zip(y_hat, ys, region.stream_outputs)]
    outs += kind.full_extras(g, ph, slots, ys)
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)


def approx_branch(region: BlockRegion, operands: list[fx.Node], slots: Slots, kind: Approximation,
                  config: FastCacheConfig, *, return_error: bool = False) -> fx.GraphModule:
    """Approximation of the block's outputs from its stream inputs and the cached state (zeros
    in place of the full branch's error sums, errors and statistic increments)."""
    g = fx.Graph()
    ph = _placeholders(g, operands)
    outs, ys = [], []
    for s, o in enumerate(region.stream_outputs):
        ys.append(set_val(kind.node(g, ph, slots, s, config), node_value(o)))
        outs.append(flat_if_symbolic(g, ys[-1]))
    if config.measures_error:
        z = g.call_function(forecast.zero_error_sums, (ph[slots.stream[0]],))
        outs += [g.call_function(operator.getitem, (z, j)) for j in range(2)]
        if return_error:
            outs += [flat_if_symbolic(g, set_val(g.call_function(torch.zeros_like, (y,)), node_value(o)))
                     for y, o in zip(ys, region.stream_outputs)]
    outs += kind.approx_extras(g, ph, slots, len(region.stream_outputs))
    g.output(tuple(outs))
    return fx.GraphModule(torch.nn.Module(), g)
