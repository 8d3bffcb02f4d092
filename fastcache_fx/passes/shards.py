"""Context parallelism as the graph shows it: the process groups of its collectives, how many ranks
each stream's tokens are split over (``token_shards``; per token segment where a stream joins a
replicated and a sharded part, ``token_segments``), and the factors that make an all-reduced
sum count every element of the whole sequence once (``sum_weights``)."""

from __future__ import annotations

import operator

import torch
from torch import fx

from .. import torch_compat
from .graph_utils import node_value


def collective_groups(gm: fx.GraphModule) -> list[str]:
    """Names of the process groups the graph's functional collectives use (``_c10d_functional``
    ops: diffusers context parallelism's Ulysses all-to-all, ring all-gather, the output
    gather), in graph order; empty for a single-process graph."""
    groups: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or "_c10d_functional" not in str(n.target) or "wait_tensor" in str(n.target):
            continue
        name = n.kwargs.get("group_name", n.args[-1] if n.args else None)
        if isinstance(name, str) and name not in groups:
            groups.append(name)
    return groups


def group_size(name: str) -> int | None:
    """World size of the process group ``name`` (as the graph's collectives name it), or None
    when it cannot be resolved here (no process group of that name in this process)."""
    return torch_compat.process_group_size(name)


#: ops that cut a tensor into pieces, whose getitem is one rank's shard when a context-parallel
#: sharder (diffusers' ``EquipartitionSharder``: ``x.chunk(world, dim)[rank]``; xDiT:
#: ``torch.chunk(x, sp_world_size, dim=-2)[rank]``) runs them on a value every rank holds whole
_CUTS = {"chunk", "tensor_split", "split"}


def _cut_count(cut: fx.Node) -> int | None:
    """Pieces a ``chunk`` / ``tensor_split`` / ``split`` node cuts along a token dimension (not
    the batch dimension of a >= 3-D value, not the feature dimension), or None."""
    x = cut.args[0] if cut.args else None
    v = node_value(x) if isinstance(x, fx.Node) else None
    if not isinstance(v, torch.Tensor) or v.dim() < 2:
        return None
    name = getattr(cut.target, "__name__", str(cut.target))
    dim = cut.kwargs.get("dim", cut.args[2] if len(cut.args) > 2 else 0)
    arg = cut.kwargs.get("chunks", cut.kwargs.get("sections", cut.kwargs.get(
        "split_size_or_sections", cut.kwargs.get("split_size", cut.args[1] if len(cut.args) > 1 else None))))
    if not isinstance(dim, int) or not isinstance(arg, int):
        return None
    dim %= v.dim()
    if dim == v.dim() - 1 or (v.dim() >= 3 and dim == 0):
        return None
    if name == "split":  # split(size): pieces of ``arg`` tokens
        size = v.shape[dim]
        return size // arg if isinstance(size, int) and arg > 0 and size % arg == 0 else None
    return arg


def token_shards(gm: fx.GraphModule, groups: list[str] | None = None, sizes: dict[str, int] | None = None
                 ) -> dict[fx.Node, int]:
    """Into how many shards, one per rank, the token dimension of each value of a
    context-parallel graph is cut: 1 where every rank holds the whole sequence (graph inputs,
    temb, a value all-gathered again), k where each rank holds 1/k of it.

    Forward data flow: a getitem of a ``chunk`` / ``tensor_split`` / ``split`` along a token
    dimension of a whole value into as many pieces as one of the graph's process groups has
    ranks (or all of them together) is a shard; an all-gather over a group of g ranks divides
    the count by g; every other op keeps the largest count of its inputs (Ulysses' all-to-all
    keeps the tokens sharded, a block maps its sharded stream to a sharded stream). A split the
    graph does not show (sharded outside it) reads as whole: the count it gives is then 1.

    Args:
        groups: the graph's process groups (``collective_groups(gm)`` when None).
        sizes: group name -> ranks (resolved with ``torch.distributed`` when None).

    Returns:
        {node: count} for every node of ``gm`` (all 1 when the graph has no collectives).
    """
    groups = collective_groups(gm) if groups is None else groups
    if sizes is None:
        sizes = {g: n for g in groups if (n := group_size(g)) is not None}
    counts = {n for n in sizes.values() if n > 1}
    if counts:
        total = 1
        for n in sizes.values():
            total *= n
        counts.add(total)
    out: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        ins = [out.get(a, 1) for a in node.all_input_nodes]
        k = max(ins, default=1)
        target = str(node.target)
        if node.op == "call_function" and "_c10d_functional" in target and "all_gather" in target:
            name = node.kwargs.get("group_name", node.args[-1] if node.args else None)
            k = max(1, k // sizes.get(name, 1)) if isinstance(name, str) else k
        elif (node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node)
              and getattr(node.args[0].target, "__name__", str(node.args[0].target)) in _CUTS
              and node.args[0].op in ("call_method", "call_function") and k == 1):
            n = _cut_count(node.args[0])
            k = n if n in counts else 1
        out[node] = k
    return out


_CATS = {"cat", "concat", "concatenate"}


def token_segments(gm: fx.GraphModule, shards: dict[fx.Node, int]) -> dict[fx.Node, tuple[tuple[int, int], ...]]:
    """The values whose token dimension (dim 1 of a >= 3-D value) joins segments split over
    different numbers of ranks: a ``cat`` of a text every rank holds whole (k = 1) and a sharded
    image (k = W), the input of a single-stream block where a model or wrapper concatenates the
    streams before the block loop. ``token_shards`` gives such a value one count (the largest),
    which would count the replicated part once per rank.

    Forward data flow: a ``cat`` along dim 1 of values with different counts starts a profile;
    a node whose value has the same leading [B, N] as one such input keeps its profile (a block
    maps its stream to a stream of the same layout); any other node has none.

    Args:
        shards: ``token_shards(gm)``.

    Returns:
        {node: ((tokens on this rank, ranks they are split over), ...) per segment in token order},
        only for the values with mixed counts (static token sizes only).
    """
    seg: dict[fx.Node, tuple[tuple[int, int], ...]] = {}
    for node in gm.graph.nodes:
        v = node_value(node)
        if not isinstance(v, torch.Tensor) or v.dim() < 3:
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and name in _CATS:
            parts = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            profile = _cat_profile(parts, dim, v.dim(), shards, seg)
            if profile is not None and len({k for _, k in profile}) > 1:
                seg[node] = profile
                continue
        src = next((a for a in node.all_input_nodes if a in seg), None)
        if src is not None and tuple(node_value(src).shape[:2]) == tuple(v.shape[:2]):
            seg[node] = seg[src]
    return seg


def _cat_profile(parts, dim, ndim: int, shards: dict, seg: dict) -> tuple[tuple[int, int], ...] | None:
    """The segments of a ``cat`` along dim 1 (``token_segments``), or None."""
    if not isinstance(dim, int) or dim % ndim != 1 or not isinstance(parts, (list, tuple)):
        return None
    out: list[tuple[int, int]] = []
    for p in parts:
        pv = node_value(p) if isinstance(p, fx.Node) else None
        if not isinstance(pv, torch.Tensor) or pv.dim() != ndim or not isinstance(pv.shape[1], int):
            return None
        for n, k in seg.get(p, ((pv.shape[1], shards.get(p, 1)),)):
            if out and out[-1][1] == k:
                out[-1] = (out[-1][0] + n, k)
            else:
                out.append((n, k))
    return tuple(out)


def sum_weights(shards: list, mesh: int, groups: list[str]) -> tuple | None:
    """The factor of each tensor's local sums before ``decision.sum_over_groups``: k / M for a
    tensor whose tokens are split over k of the M ranks the all-reduce counts (M: the product of
    the groups' sizes), so that the all-reduced sum counts every element of the whole sequence
    exactly once, a replicated tensor (k = 1) included: the sum equals one process's.

    Args:
        shards: per tensor, its count k (``token_shards``) or its segments ((tokens, k), ...)
            (``token_segments``), which give a tuple of per-token factors instead.

    Returns:
        One entry per tensor (``decision.sq_sums``' weights); None without process groups (one
        process: the plain sums)."""
    if not groups:
        return None
    return tuple(sum(((k / mesh,) * n for n, k in s), ()) if isinstance(s, tuple) else s / mesh for s in shards)
