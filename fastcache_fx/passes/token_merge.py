"""Token-merge pyramid: k-NN density merging of tokens between stages, unmerged at the end.

FastCache (arXiv 2505.20353 v3, its multi-stage spatial-temporal token merging) as a pure graph
pass with static shapes. The blocks are split into ``num_stages`` contiguous stages; before every
stage but the first, the stream tokens are merged (``merge_tokens``), and after the last block
they are unmerged and the stage changes are added back (``unmerge_add``). Everything is tensor
ops inside the compiled graph: no Python loop over tokens, windows or clusters.

Windows. The image tokens form an h x w grid (from the patch-embedding output, or a square
N). It is cut into windows of ``token_merge_window`` x ``token_merge_window`` tokens (the
largest divisors of h and w not above it; G windows of W tokens). Every stage merges inside
these windows: window g keeps C_s = round(C_{s-1} * merge_ratio) (>= 1) clusters, C_0 = W, so
the stage-s stream has G * C_s tokens, fixed at compile time. Distances are only computed
inside a window, so one merge costs O(N * W * D) instead of O(N^2 D). The merged stream lists
tokens window by window (attention does not care about the order: DiT and PixArt add their
position embedding before the first block); ``unmerge_add`` restores the grid order.

Aggregation. With Y_s the output of stage s at its own resolution (the paper's Z[s]) and X_s
the merged input of stage s: H_{S-1} = Y_{S-1}, H_{s-1} = Y_{s-1} + Unpool_{s-1}(H_s - X_s), and
H_0 replaces the last block's output. The paper adds the unpooled coarse *output* (H_agg + Z[s]);
we unpool the coarse stage's *change*, so the residual stream is not counted twice and a stage
that changes nothing returns exactly its input.

Temporal saliency. rho_tm compares the tokens at a merge point with the previous step's (state
owned by the runtime); on the first step of a trajectory rho_tm = 0 for every token (importance
= density alone). At the second and later merge points token i is the i-th cluster of the
previous merge: the same token across steps only while the assignments stay the same.

Graph contract (``contract.GraphContract``, ``TokenMergeResult.contract``): the trajectory clock
(state "step", "prev_t", which the block-cache pass then shares) and the previous step's tokens
at every merge point ("token_merge.previous.<s>"); the block-cache pass extends the same
contract, and the runtime binds and splits both passes' inputs and outputs through it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import FastCacheConfig
from ..contract import GraphContract
from ..ops.token_merge import merge_tokens, unmerge_add
from .blocks import BlockRegion, find_blocks, find_timestep, remap_region, tensor_meta
from .graph_utils import clone_graph_module, node_value, recompile_with_values
from .extra_io import ExtraIO

# ----------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenMergeResult:
    """What ``apply_token_merge`` did.

    ``applied`` is False (graph unchanged) with ``reason`` when the blocks do not fit. Stage s
    holds the blocks ``stages[s]`` and ``tokens_per_stage[s]`` tokens per sample; ``grid`` is
    (h, w) and ``window`` (wh, ww) the token windows; ``contract`` the graph's extra inputs and
    outputs (the clock and the previous tokens at every merge point).
    """

    applied: bool
    reason: str = ""
    stages: list[list[str]] = field(default_factory=list)
    tokens_per_stage: list[int] = field(default_factory=list)
    grid: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    contract: GraphContract | None = None


def _largest_divisor(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _token_grid(gm: fx.GraphModule, n: int) -> tuple[int, int]:
    """(h, w) of the image tokens: a 4-D glue value [B, C, h, w] with h * w = N (the patch
    embedding's conv output), else a square N, else one row of N tokens."""
    for node in gm.graph.nodes:
        v = node_value(node)
        if node.op.startswith("call_") and isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2] * v.shape[3] == n:
            return int(v.shape[2]), int(v.shape[3])
    r = math.isqrt(n)
    return (r, r) if r * r == n else (1, n)


def _stage_split(n_blocks: int, n_stages: int) -> list[list[int]]:
    sizes = [n_blocks // n_stages + (1 if i < n_blocks % n_stages else 0) for i in range(n_stages)]
    out, i = [], 0
    for s in sizes:
        out.append(list(range(i, i + s)))
        i += s
    return out



def apply_token_merge(gm: fx.GraphModule, config: FastCacheConfig,
                      regions: list[BlockRegion] | None = None) -> tuple[fx.GraphModule, TokenMergeResult]:
    """Insert the token-merge pyramid into a copy of ``gm`` (FastCache v3 token merging).

    Stages: min(``num_stages``, L) contiguous groups of the L blocks. Before the first block of
    stage s >= 1 its stream input Y_{s-1} is merged (``merge_tokens``) to X_s; after the last
    block, H_{S-1} = Y_{S-1} and H_{s-1} = Y_{s-1} + Unpool_{s-1}(H_s - X_s) (``unmerge_add``)
    replaces the last block's output for the glue. Node ``meta["val"]`` of the whole graph is
    refreshed by fake-tensor propagation, so ``find_blocks`` and the block-cache pass size
    their state from the merged shapes.

    A block region must be token-count generic (diffusers' attention uses
    ``view(batch, -1, heads, head_dim)``): the pass checks this by propagating the merged
    shapes; a node that bakes N (or glue between blocks that mixes in [B, N, D] values) makes
    the propagation fail or a block output keep N tokens, and the graph is then left alone.

    Returns:
        (gm', TokenMergeResult); with ``applied`` False, gm' is ``gm`` itself and ``reason``
        says why (no blocks, joint blocks, one stage, a block not token-count generic...).
    """
    regions = find_blocks(gm).regions if regions is None else regions
    if not regions:
        return gm, TokenMergeResult(False, "no transformer blocks")
    if any(len(r.stream_inputs) != 1 for r in regions):
        return gm, TokenMergeResult(False, "joint blocks (two streams) are not merged")
    metas = [tensor_meta(r.stream_inputs[0]) for r in regions]
    if len({m[0] for m in metas}) != 1 or len(metas[0][0]) != 3:
        return gm, TokenMergeResult(False, "blocks do not share one [B, N, D] stream shape")
    (bsz, n, d), dtype = metas[0]
    n_stages = min(config.num_stages, len(regions))
    if n_stages < 2:
        return gm, TokenMergeResult(False, "fewer than two stages")
    h, w = _token_grid(gm, n)
    wh, ww = _largest_divisor(h, config.token_merge_window), _largest_divisor(w, config.token_merge_window)
    if h == 1:  # no grid: windows of window^2 consecutive tokens
        ww = _largest_divisor(w, config.token_merge_window ** 2)
    groups, per_window = (h // wh) * (w // ww), wh * ww
    clusters = [per_window]
    for _ in range(n_stages - 1):
        clusters.append(max(1, int(round(clusters[-1] * config.merge_ratio))))
    split = _stage_split(len(regions), n_stages)
    result = TokenMergeResult(True, "", [[regions[i].name for i in st] for st in split],
                              [groups * c for c in clusters], (h, w), (wh, ww))

    # the stream between stages must feed nothing but the next block
    for st in split[1:]:
        r = regions[st[0]]
        y = r.stream_inputs[0]
        members = set(r.nodes)
        if any(u not in members for u in y.users):
            return gm, TokenMergeResult(False, f"stream input of {r.name} is also read outside the block")

    orig_gm = gm
    gm, val_map = clone_graph_module(gm)
    regions = [remap_region(r, val_map) for r in regions]
    graph = gm.graph
    io = ExtraIO(graph)
    step_node, _ = io.clock(find_timestep(io.placeholders))
    prev_in = [io.state(f"token_merge.previous.{s}", (bsz, result.tokens_per_stage[s - 1], d), dtype, 0.0)
               for s in range(1, n_stages)]

    _insert_pyramid(graph, io, regions, split, clusters, (h, w, wh, ww), groups, config, step_node, prev_in)
    result.contract = io.finish()
    why = recompile_with_values(gm)
    if why is not None:
        return orig_gm, TokenMergeResult(False, f"blocks are not token-count generic: {why}")
    for s, st in enumerate(split):
        for i in st:
            got = tensor_meta(regions[i].stream_outputs[0])[0]
            if got[1] != result.tokens_per_stage[s]:
                return orig_gm, TokenMergeResult(False, f"{regions[i].name} output keeps {got[1]} tokens after merging "
                                                        f"(expected {result.tokens_per_stage[s]})")
    return gm, result


def _insert_pyramid(graph: fx.Graph, io: ExtraIO, regions: list[BlockRegion], split: list[list[int]],
                    clusters: list[int], grid: tuple[int, int, int, int], groups: int, config: FastCacheConfig,
                    step_node: fx.Node, prev_in: list[fx.Node]) -> None:
    """Insert ``merge_tokens`` before the first block of every stage s >= 1 and the ``unmerge_add``
    chain after the last block (``apply_token_merge``); registers the new previous tokens."""
    h, w, wh, ww = grid
    n_stages = len(split)
    zs, xs, assigns, layouts = [], [], [], []
    for s in range(1, n_stages):
        r = regions[split[s][0]]
        y = r.stream_inputs[0]
        layout = dict(grid=(h, w, wh, ww) if s == 1 else None, groups=groups)
        kw = dict(layout, clusters=clusters[s], k=config.token_merge_k, lam=config.token_merge_lambda)
        with graph.inserting_before(r.nodes[0]):
            m = graph.call_function(merge_tokens, (y, prev_in[s - 1], step_node), kw)
            x_s = graph.call_function(operator.getitem, (m, 0))
            a_s = graph.call_function(operator.getitem, (m, 1))
            p_s = graph.call_function(operator.getitem, (m, 2))
        members = set(r.nodes)
        y.replace_all_uses_with(x_s, delete_user_cb=lambda u: u in members)
        zs.append(y)
        xs.append(x_s)
        assigns.append(a_s)
        layouts.append(layout)
        io.output("state", io.name(prev_in[s - 1]), p_s)

    last = regions[-1]
    y_last = last.stream_outputs[0]
    users = [u for u in y_last.users if u not in set(last.nodes)]
    hcur = y_last
    for s in reversed(range(1, n_stages)):
        with graph.inserting_after(hcur):
            hcur = graph.call_function(unmerge_add, (zs[s - 1], hcur, xs[s - 1], assigns[s - 1]), layouts[s - 1])
    for u in users:
        u.replace_input_with(y_last, hcur)
