"""Graph plumbing every pass uses: copying a Dynamo graph, its inputs and outputs, new placeholders,
refreshing node values after a pass changes shapes."""

from __future__ import annotations

import torch
from torch import fx

from .. import torch_compat

def node_value(node: fx.Node):
    """The example value of a node (FakeTensor or real), whichever meta key Dynamo/make_fx set."""
    return node.meta.get("val", node.meta.get("example_value"))


def clone_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` whose graph can be rewritten without touching Dynamo's own graph.

    Keeps what AOTAutograd reads off a Dynamo graph (``meta``, ``_param_name_to_source``,
    placeholders' ``_dynamo_source``). Returns (copy, old node -> new node).
    """
    g = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    new = fx.GraphModule(gm, g)
    new.meta = dict(gm.meta)
    torch_compat.copy_dynamo_sources(gm, new, val_map)
    return new, val_map


def graph_io(graph: fx.Graph) -> tuple[list[fx.Node], fx.Node, list, bool]:
    """(placeholders, output node, the user outputs as a list, whether they were a tuple)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in graph.nodes if n.op == "output")
    out = out_node.args[0]
    is_tuple = isinstance(out, (tuple, list))
    return placeholders, out_node, list(out) if is_tuple else [out], is_tuple


def insert_placeholder(graph: fx.Graph, after: fx.Node, name: str, val) -> fx.Node:
    """A new placeholder right after ``after`` with ``meta["val"]`` = ``val`` (a meta tensor)."""
    with graph.inserting_after(after):
        p = graph.placeholder(name)
    p.meta["val"] = p.meta["example_value"] = val
    torch_compat.forget_placeholder_source(p)
    return p


def refresh_node_values(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` (and Dynamo's ``example_value``) of every node of ``gm`` with fake
    tensors propagated from its placeholders' values; placeholders holding meta tensors (state
    added by a pass) are placed on the device of the other inputs. Run after a pass changes
    token counts, so later passes size their state from the new shapes."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    vals = [node_value(p) for p in gm.graph.nodes if p.op == "placeholder"]
    device = next((v.device for v in vals if isinstance(v, torch.Tensor) and v.device.type != "meta"),
                  torch.device("cpu"))
    # a fresh mode: Dynamo's values may belong to a mode that is not the ambient one
    mode = torch_compat.new_fake_mode()
    fake = []
    for v in vals:
        if isinstance(v, torch.Tensor):
            dev = device if v.device.type == "meta" else v.device
            with mode:
                v = torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype, device=dev)
        fake.append(v)
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)
    for node in gm.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


def recompile_with_values(gm: fx.GraphModule) -> str | None:
    """Lint and recompile ``gm`` after a token-count change, then ``refresh_node_values``.

    Returns:
        None, or "<error type>: <first line>" when shape propagation fails (a node bakes the old
        token count, or glue mixes tensors of the old and new counts).
    """
    try:
        gm.graph.lint()
        gm.recompile()
        refresh_node_values(gm)
    except Exception as e:  # any propagation error means: leave the graph alone
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def has_symbolic_shapes(gm: fx.GraphModule) -> bool:
    """Some placeholder of ``gm`` has a symbolic size (Dynamo traced dynamic shapes)."""
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = node_value(n)
        if isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape)):
            return True
    return False


def ancestors(nodes) -> set[fx.Node]:
    """``nodes`` and every node they depend on (transitively)."""
    need, stack = set(), list(nodes)
    while stack:
        n = stack.pop()
        if n not in need:
            need.add(n)
            stack.extend(n.all_input_nodes)
    return need
