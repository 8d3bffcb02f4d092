"""The layout of a block's ``torch.cond`` operands: contiguous, with strides Inductor keeps, and no
two aliasing one buffer (used by ``passes.block_cache``)."""

from __future__ import annotations

import torch
from torch import fx

from ..ops import decision as D
from .blocks import BlockRegion, tensor_meta
from .extra_io import Cursor
from .graph_utils import node_value


def _contiguous_meta(v: torch.Tensor) -> torch.Tensor:
    """The example value of ``v.contiguous()`` (fake or meta)."""
    mode = getattr(v, "fake_mode", None)
    if mode is None:
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    with mode:
        return torch.empty(v.shape, dtype=v.dtype, device=v.device)


def _aliased_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The placeholders among ``nodes`` whose example values share storage with another's."""
    from torch.multiprocessing.reductions import StorageWeakRef

    by_storage: dict = {}
    for n in nodes:
        v = node_value(n)
        if n.op == "placeholder" and isinstance(v, torch.Tensor):
            by_storage.setdefault(StorageWeakRef(v.untyped_storage()).cdata, []).append(n)
    return [n for group in by_storage.values() if len(group) > 1 for n in group]


def _contiguous_operand(cur, op: fx.Node) -> fx.Node:
    """``op`` as a cond operand with contiguous strides. A value traced contiguous gets
    ``fixed_contiguous`` (no copy unless Inductor picked another layout); one traced strided gets
    a copy first: Inductor keeps a view whose stride *order* is already contiguous (Wan's rotary
    ``freqs[..., 0::2]``: strides (12, 2) for sizes (16, 6)) through ``fixed_contiguous``, and
    lays a bare ``clone`` of a transposed input out transposed again (HunyuanVideo 1.5's block
    input); the branch, traced with contiguous strides, asserts them."""
    val = _contiguous_meta(node_value(op))
    if not node_value(op).is_contiguous():
        op = cur.call(torch.clone, op, val=val, memory_format=torch.contiguous_format)
    return cur.call(D.fixed_contiguous, op, val=val)


def contiguous_operands(cur: Cursor, region: BlockRegion, operands: list) -> tuple[list, list]:
    """(cond operands, stream inputs) with a layout the branches can rely on.

    cond operands must be contiguous with a layout Inductor keeps (a non-contiguous one gave
    wrong results under AOTInductor, and the branches assert the strides they were traced
    with; see decision.fixed_contiguous). Graph inputs too: a fragment after a graph break gets
    views (Wan's rotary under context parallelism), and a regional block graph gets the layout
    its caller passes (HunyuanVideo 1.5's block at 17 frames: a transposed [B, N, D]); for a
    contiguous input the constraint is a no-op. Graph inputs that are views of one buffer
    (CogVideoX's block gets its two streams as slices of one tensor) each get their own copy:
    cond refuses aliased operands."""
    ins = list(dict.fromkeys(region.stream_inputs + region.context_inputs))
    contig = {op: _contiguous_operand(cur, op) for op in ins if tensor_meta(op) is not None}
    for op in _aliased_inputs(ins):
        contig[op] = cur.call(torch.clone, op, val=_contiguous_meta(node_value(op)),
                              memory_format=torch.contiguous_format)
    return [contig.get(o, o) for o in operands], [contig.get(hh, hh) for hh in region.stream_inputs]
