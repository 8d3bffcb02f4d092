"""Find the transformer-block regions of a Dynamo graph.

A block is one element of a ``ModuleList`` of identical modules (``transformer_blocks.<i>``,
``single_transformer_blocks.<i>``...). Dynamo tags every traced node with the module stack it
ran under (``node.meta["nn_module_stack"]``); a node belongs to block ``<i>`` when the outermost
indexed entry of its stack *ends* with ``.<i>`` (anchored: DiT calls
``transformer_blocks[0].norm1.emb`` again for its output layer, which must stay glue).

For each region we work out, from data flow alone:
- stream inputs/outputs: residual-stream tensors [B, N, D] the block maps to the same shape
  (one stream for DiT/PixArt, two for SD3/Flux joint blocks), paired in order;
- context inputs: every other non-parameter value the block reads (temb, rotary embeddings,
  masks, cross-attention states);
- parameter inputs: placeholders holding weights.
A region that does not fit (no stream, outputs that are not streams, not convex) is reported in
``left_alone`` with the reason and is not rewritten.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from .. import torch_compat
from .graph_utils import graph_io, node_value

# "...['transformer_blocks'].3" or "transformer_blocks.3" (plain module paths)
_INDEXED = re.compile(r"^(?P<list>.*?)(?:'\])?\.(?P<idx>\d+)$")
_PARAM_NAME = re.compile(r"_(parameters|buffers)_")
# "timestep" anywhere, or an input named just ``t`` (Z-Image's ``forward(x, t, ...)``: Dynamo's "l_t_")
_TIMESTEP = re.compile(r"timestep|^(l_(kwargs_)?)?t_?$", re.IGNORECASE)


def tensor_meta(node) -> tuple[tuple, torch.dtype] | None:
    v = node_value(node) if isinstance(node, fx.Node) else None
    if isinstance(v, torch.Tensor):
        return tuple(v.shape), v.dtype
    return None


def is_param(node: fx.Node) -> bool:
    """A placeholder holding a parameter or buffer (Dynamo lifts them to graph inputs)."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    return bool(_PARAM_NAME.search(node.name)) or isinstance(node_value(node), torch.nn.Parameter)


def _clean_path(path: str) -> str:
    """Dynamo's ``L['self'].__dict__['_modules']['transformer_blocks'].3`` -> ``transformer_blocks.3``."""
    p = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    p = re.sub(r"\['([^']+)'\]", r".\1", p)
    p = re.sub(r"^L\.self\.?|^L\['self'\]\.?|^self\.?", "", p)
    return p.lstrip(".")


def block_of(node: fx.Node) -> tuple[str, str, int, str] | None:
    """(block name, list name, index, module type name) of the block a node runs in, or None."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for path, mtype in stack.values():
        clean = _clean_path(path)
        m = _INDEXED.match(clean)
        if m:
            tname = mtype.__name__ if isinstance(mtype, type) else str(mtype).rsplit(".", 1)[-1]
            return clean, m.group("list"), int(m.group("idx")), tname
    return None


@dataclass
class BlockRegion:
    """One block of the graph: its nodes (graph order) and its inputs/outputs."""

    name: str
    list_name: str
    index: int
    module_type: str
    nodes: list[fx.Node]
    stream_inputs: list[fx.Node] = field(default_factory=list)
    stream_outputs: list[fx.Node] = field(default_factory=list)
    context_inputs: list[fx.Node] = field(default_factory=list)
    param_inputs: list[fx.Node] = field(default_factory=list)

    @property
    def stream_shapes(self) -> list[tuple]:
        return [tensor_meta(n)[0] for n in self.stream_outputs]


@dataclass
class BlockSearchResult:
    """What ``find_blocks`` found: usable regions in graph order, and blocks left alone with why."""

    regions: list[BlockRegion]
    left_alone: list[tuple[str, str]]


def external_inputs(nodes: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    """The values ``nodes`` read that are not in ``members``, in first-use order."""
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members:
                seen.setdefault(a, None)
    return list(seen)


def _outputs(nodes: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    return [n for n in nodes if any(u not in members for u in n.users)]


def _is_convex(nodes: list[fx.Node], members: set[fx.Node]) -> bool:
    """No path leaves the region and comes back (required to replace it by one node)."""
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    last = max(order[n] for n in nodes)
    frontier = [u for n in nodes for u in n.users if u not in members]
    seen = set()
    while frontier:
        u = frontier.pop()
        if u in seen or order[u] > last:
            continue
        seen.add(u)
        for w in u.users:
            if w in members:
                return False
            frontier.append(w)
    return True


def shape_arithmetic(node: fx.Node) -> bool:
    """A scalar computed from graph inputs and scalars only (SymInt/SymFloat arithmetic of a
    dynamic-shape graph, such as the token count the output layer reads, or ``.item()`` of a float
    attribute that ``dynamic=True`` passes as a 0-d tensor): glue wherever Dynamo recorded it.
    A data-dependent scalar (an unbacked symbol) is not: it belongs to the tensor it came from."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    scalar = (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)
    v = node_value(node)
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) and free_unbacked_symbols(v):
        return False  # data-dependent (the size of a nonzero() in Mochi's attention): stays with its block
    return isinstance(v, scalar) and all(
        a.op == "placeholder" or isinstance(node_value(a), scalar) for a in node.all_input_nodes)


def find_blocks(gm: fx.GraphModule) -> BlockSearchResult:
    """Find every block region of ``gm`` (pure: ``gm`` is not modified).

    Only the shallowest lists count as block lists: a ``ModuleList`` nested inside another
    submodule (Chroma's guidance approximator's ``norms``, a text refiner's blocks) is glue.

    Returns:
        BlockSearchResult with regions in graph order; ``left_alone`` lists (block name, reason).
    """
    groups: dict[str, list[fx.Node]] = {}
    info: dict[str, tuple[str, int, str]] = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call_") or shape_arithmetic(node):
            continue
        b = block_of(node)
        if b is None:
            continue
        name, lst, idx, tname = b
        groups.setdefault(name, []).append(node)
        info[name] = (lst, idx, tname)

    # a block list holds identical module types; mixed lists are not blocks (e.g. ff.net)
    types_by_list: dict[str, set[str]] = {}
    for name, (lst, _, tname) in info.items():
        types_by_list.setdefault(lst, set()).add(tname)

    consumers: dict[fx.Node, set[str]] = {}
    for name, nodes in groups.items():
        members = set(nodes)
        for a in external_inputs(nodes, members):
            consumers.setdefault(a, set()).add(name)

    # the model's block lists are its shallowest ones: a list nested in another module (Chroma's
    # distilled_guidance_layer.norms, a text refiner's blocks) is part of that module's glue
    depth = min((lst.count(".") for lst in types_by_list), default=0)
    regions, left = [], []
    for name, nodes in groups.items():
        lst, idx, tname = info[name]
        if lst.count(".") > depth:
            left.append((name, f"{lst} is nested in another module (the model's block lists are its shallowest)"))
            continue
        if len(types_by_list[lst]) != 1:
            left.append((name, f"{lst} mixes module types {sorted(types_by_list[lst])}"))
            continue
        reason, region = analyse_region(name, lst, idx, tname, nodes, consumers)
        if region is None:
            left.append((name, reason))
        else:
            regions.append(region)
    return BlockSearchResult(regions, left)


#: ops that only slice or view a value (diffusers' context-parallel split hook runs them on a
#: block's inputs inside the block's own module call)
_SLICING = {"chunk", "split", "tensor_split", "narrow", "getitem", "contiguous", "select", "slice"}


def _peel_input_slicing(nodes: list[fx.Node]) -> list[fx.Node]:
    """``nodes`` without its leading slicing of outside values (repeated to a fixed point): the
    shard a context-parallel input hook cuts from the full input belongs to the glue."""
    members = set(nodes)
    changed = True
    while changed:
        changed = False
        for n in list(members):
            target = getattr(n.target, "__name__", str(n.target))
            if (target in _SLICING and n.all_input_nodes
                    and all(a not in members and not is_param(a) for a in n.all_input_nodes)):
                members.discard(n)
                changed = True
    return [n for n in nodes if n in members]


def analyse_region(name, lst, idx, tname, nodes, consumers, peeled: bool = False) -> tuple[str, BlockRegion | None]:
    """("", the BlockRegion) of ``nodes`` (a block, or a span of blocks: ``passes.spans``), or (why
    not, None): its outputs must be [B, N, D] tensors, each with an input of the same shape and
    dtype (its stream; one no other region reads, ``consumers`` {value: region names}, preferred),
    and the region convex. ``name``, ``lst``, ``idx``, ``tname``: the region's name, block list,
    index and module type."""
    members = set(nodes)
    inputs = external_inputs(nodes, members)
    outputs = _outputs(nodes, members)
    if not outputs:
        return "block output is unused", None
    for o in outputs:
        if tensor_meta(o) is None or len(tensor_meta(o)[0]) != 3:
            return f"output {o.name} is not a [B, N, D] tensor", None
    if not _is_convex(nodes, members):
        return "region is not convex (glue between its nodes depends on it)", None
    params = [a for a in inputs if is_param(a)]
    others = [a for a in inputs if not is_param(a)]
    metas = {a: tensor_meta(a) for a in others}
    # stream inputs: same shape/dtype as an output; prefer values no other block reads
    # (contexts such as temb or cross-attention states are read by every block)
    streams_in: list[fx.Node] = []
    for o in outputs:
        cands = [a for a in others if metas[a] == tensor_meta(o) and a not in streams_in]
        own = [a for a in cands if consumers.get(a, set()) == {name}]
        pick = own or cands
        if not pick:
            rest = _peel_input_slicing(nodes) if not peeled else nodes
            if len(rest) < len(nodes):  # the block slices its inputs first (context parallelism)
                return analyse_region(name, lst, idx, tname, rest, consumers, peeled=True)
            return f"no input has the shape of output {o.name} {tensor_meta(o)[0]}", None
        streams_in.append(pick[0])
    context = [a for a in others if a not in streams_in]
    return "", BlockRegion(name, lst, idx, tname, nodes, streams_in, outputs, context, params)


def block_lists(module: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    """The block lists of a model, from its module tree (regional compilation of models without
    diffusers' ``_repeated_blocks``): direct ``ModuleList`` children whose elements all have one
    class with parameters (``transformer_blocks``, ``single_transformer_blocks``...), the rule
    ``find_blocks`` applies to a graph."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 0:
            types = {type(m) for m in child}
            if len(types) == 1 and any(True for _ in child[0].parameters()):
                out.append((name, child))
    return out


def root_module_class(gm: fx.GraphModule) -> str | None:
    """Class name of the module whose ``forward`` Dynamo traced into ``gm`` (e.g.
    ``"FluxTransformerBlock"`` when a block was compiled on its own), or None if unknown.
    Read from the tracing context while the backend runs (the first traced code object)."""
    code = torch_compat.traced_code()
    if code is not None:
        qual = getattr(code, "co_qualname", "")
        if qual.endswith(".forward") and qual.count(".") == 1:
            return qual.split(".")[0]
    return None


def find_block_graph(gm: fx.GraphModule) -> BlockRegion | str:
    """The whole of ``gm`` as one block region, when ``gm`` is the graph of one transformer block
    compiled on its own (regional compilation: ``compile_repeated_blocks``, one graph per block
    class, parameters as inputs). Pure: ``gm`` is not modified.

    A graph is a block graph when the module Dynamo traced is a block class (its class
    name ends with ``Block``, as every diffusers transformer block's does) and its
    outputs are [B, N, D] tensors computed from inputs of the same shapes (the streams).

    Returns:
        the BlockRegion (named after the class), or the reason it is not a block graph.
    """
    cls = root_module_class(gm)
    if cls is None or not cls.endswith("Block"):
        return f"the compiled module ({cls or 'unknown'}) is not a transformer block class"
    nodes = [n for n in gm.graph.nodes if n.op.startswith("call_") and not shape_arithmetic(n)]
    if not nodes:
        return f"{cls}: the graph computes nothing"
    _, _, outs, _ = graph_io(gm.graph)
    for o in outs:
        if isinstance(o, fx.Node) and o.op.startswith("call_"):
            continue
        if o is None:
            continue
        return f"{cls}: output {o} is not computed by the block"
    members = set(nodes)
    consumers = {a: {cls} for a in external_inputs(nodes, members)}
    reason, region = analyse_region(cls, cls, 0, cls, nodes, consumers)
    return region if region is not None else f"{cls}: {reason}"


def find_timestep(placeholders: list[fx.Node]) -> fx.Node | None:
    """The model's timestep input (a non-parameter tensor placeholder named like ``timestep``, or
    named ``t``)."""
    for p in placeholders:
        if not is_param(p) and _TIMESTEP.search(p.name) and tensor_meta(p) is not None:
            return p
    return None


def remap_region(region: BlockRegion, val_map: dict[fx.Node, fx.Node]) -> BlockRegion:
    """The same region expressed with the nodes of a cloned graph."""
    m = lambda ns: [val_map[n] for n in ns]
    return BlockRegion(region.name, region.list_name, region.index, region.module_type, m(region.nodes),
                       m(region.stream_inputs), m(region.stream_outputs), m(region.context_inputs),
                       m(region.param_inputs))
