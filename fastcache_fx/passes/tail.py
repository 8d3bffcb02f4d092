"""Replaying a graph's output layer ("tail": the nodes from the last block to the model's outputs)
on perturbed last-block outputs, for the output-level error budget (``ops.output_error``)."""

from __future__ import annotations

from torch import fx

from .graph_utils import ancestors, node_value


def replay_tail(graph: fx.Graph, before: fx.Node, user_outputs: list[fx.Node], streams: list[fx.Node],
                perturbed: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """Copy the nodes on the paths from ``streams`` to ``user_outputs`` with each stream replaced by
    its ``perturbed`` node, inserted before ``before`` (the output node); the rest of the graph
    (time embedding, the tail's parameters) is shared, not copied.

    Args:
        user_outputs: the model's own output nodes. streams / perturbed: the last block's output
            streams and their perturbed values (same shapes).

    Returns:
        (the output nodes that depend on the streams and hold floating tensors, their replayed
        copies), in the same order; empty lists when no output depends on the streams.
    """
    need = ancestors(user_outputs)
    dirty = set(streams)
    order = []
    for n in graph.nodes:
        if n is before:
            break
        if n not in dirty and n in need and any(a in dirty for a in n.all_input_nodes):
            dirty.add(n)
            order.append(n)
    env = dict(zip(streams, perturbed))
    with graph.inserting_before(before):
        for n in order:
            env[n] = graph.node_copy(n, lambda a: env.get(a, a))
    real = [o for o in user_outputs if o in dirty and _floating(o)]
    return real, [env[o] for o in real]


def _floating(n: fx.Node) -> bool:
    v = node_value(n)
    return v is not None and hasattr(v, "dtype") and v.dtype.is_floating_point
