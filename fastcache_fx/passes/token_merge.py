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
from .blocks import BlockRegion, find_blocks, find_timestep, remap_region, tensor_meta
from .graph_utils import clone_graph_module, node_value, recompile_with_values
from .extra_io import ExtraIO

# mean k-NN distance (normalised) is clamped here so that exp(-x) stays a normal float32
_MAX_EXPONENT = 50.0


# ----------------------------------------------------------------------------------------------
# tensor functions (called from the graph; AOTAutograd traces through them)
# ----------------------------------------------------------------------------------------------

def to_windows(x: torch.Tensor, grid: tuple[int, int, int, int] | None, groups: int) -> torch.Tensor:
    """[B, N, D] -> [B, G, W, D]. ``grid`` = (h, w, wh, ww): an h x w token grid cut into
    wh x ww windows (stage-0 tokens in row-major grid order); None: tokens already listed
    window by window (merged stages)."""
    b, n, d = x.shape
    if grid is None:
        return x.reshape(b, groups, n // groups, d)
    h, w, wh, ww = grid
    x = x.reshape(b, h // wh, wh, w // ww, ww, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, groups, wh * ww, d)


def from_windows(x: torch.Tensor, grid: tuple[int, int, int, int] | None) -> torch.Tensor:
    """Inverse of ``to_windows``: [B, G, W, D] -> [B, N, D] (grid order for a grid)."""
    b, g, wn, d = x.shape
    if grid is None:
        return x.reshape(b, g * wn, d)
    h, w, wh, ww = grid
    x = x.reshape(b, h // wh, w // ww, wh, ww, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, d)


def local_ctm(x: torch.Tensor, motion: torch.Tensor, *, clusters: int, k: int, lam: float):
    """Local clustering-based token merge (LocalCTM) inside windows.

    FastCache (arXiv 2505.20353 v3) token merging: importance S_i = rho_sp,i * (1 + lambda * rho_tm,i) with spatial density
    rho_sp,i = exp(-(1/K) sum_{j in kNN(i)} d_ij) and d_ij = ||h_i - h_j||^2 / mean_{i != j}
    ||h_i - h_j||^2 (squared distances divided by their mean over the window's pairs: scale
    free, ~1 on average, so exp neither underflows nor saturates; the mean k-NN distance is
    also clamped at 50). Cluster centres are density peaks (DPC-kNN, Rodriguez & Laio 2014):
    the ``clusters`` tokens with the largest S_i * delta_i, delta_i = min distance to a token of
    higher importance (ties broken by index; the largest distance for the most important one). Every token joins its
    nearest centre (a centre always its own cluster); a cluster is the importance-weighted
    average h~_c = sum_{j in C_c} S_j h_j / sum_{j in C_c} S_j.

    Args:
        x: tokens [B, G, W, D] (G windows of W tokens).
        motion: temporal saliency rho_tm [B, G, W] (>= 0; zeros on the first step).
        clusters: C, clusters per window (1 <= C <= W). k: neighbours (clamped to W - 1).
        lam: lambda, the weight of rho_tm.

    Returns:
        (merged [B, G, C, D] in x.dtype, assign [B, G, W] int64 cluster of each token,
        importance S [B, G, W] (float32, float64 for float64 x), centres [B, G, C] int64 token
        index of each cluster's centre, in window order).
    """
    b, g, w, d = x.shape
    xf = x if x.dtype == torch.float64 else x.float()  # half precision: distances in float32
    sq = (xf * xf).sum(-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (xf @ xf.transpose(-1, -2))).clamp_min(0.0)
    eye = torch.eye(w, dtype=torch.bool, device=x.device)
    d2 = d2.masked_fill(eye, 0.0)  # the expansion leaves rounding noise on the diagonal
    pairs = max(w * (w - 1), 1)
    scale = d2.sum((-1, -2), keepdim=True) / pairs
    # tiny floor relative to the token norms: identical tokens give d = 0 instead of 0 / 0
    floor = 1e-12 * (1.0 + sq.mean(-1, keepdim=True).unsqueeze(-1))
    dn = d2 / (scale + floor)
    kk = max(1, min(k, w - 1))
    if w > 1:
        knn = dn.masked_fill(eye, float("inf")).topk(kk, dim=-1, largest=False).values
        rho_sp = torch.exp(-knn.mean(-1).clamp_max(_MAX_EXPONENT))
    else:
        rho_sp = torch.ones_like(sq)
    s = rho_sp * (1.0 + lam * motion.to(xf.dtype))
    # [.., i, j]: token j ranks above i; equal importance ranks the lower index higher, so of
    # identical tokens only the first can be a peak (the others are at distance 0 from it)
    idx = torch.arange(w, device=x.device)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    higher = (sj > si) | ((sj == si) & (idx.view(1, w) < idx.view(w, 1)))
    delta = dn.masked_fill(~higher, float("inf")).amin(-1)
    delta = torch.where(torch.isinf(delta), dn.amax(-1), delta)
    centres = (s * delta).topk(clusters, dim=-1).indices.sort(-1).values  # [B, G, C]
    dc = dn.gather(-1, centres.unsqueeze(-2).expand(b, g, w, clusters))  # [B, G, W, C]
    own = idx.view(1, 1, w, 1) == centres.unsqueeze(-2)
    assign = dc.masked_fill(own, -1.0).argmin(-1)
    onehot = (assign.unsqueeze(-1) == torch.arange(clusters, device=x.device)).to(xf.dtype)
    wts = onehot * s.unsqueeze(-1)  # [B, G, W, C]
    merged = (wts.transpose(-1, -2) @ xf) / wts.sum(-2).unsqueeze(-1)
    return merged.to(x.dtype), assign, s, centres


def temporal_saliency(y: torch.Tensor, prev: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """rho_tm,i = ||h_t,i - h_{t-1},i|| / mean_j ||h_t,j - h_{t-1},j|| per sample: [B, N] float32.

    Divided by its mean so lambda weighs a dimensionless saliency (mean 1); zeros on the first
    step of a trajectory (``first``: [] bool), so the importance is then the density alone.
    """
    m = (y.float() - prev.float()).norm(dim=-1)
    m = m / (m.mean(-1, keepdim=True) + 1e-12)
    return torch.where(first, torch.zeros_like(m), m)


def merge_tokens(y: torch.Tensor, prev: torch.Tensor, step: torch.Tensor, *, grid, groups: int,
                 clusters: int, k: int, lam: float):
    """One merge point of the pyramid (graph-level wrapper of ``local_ctm``).

    Args:
        y: the previous stage's output [B, N_s, D] (grid order at stage 0, else window order).
        prev: y of the previous step [B, N_s, D] (run-time state). step: [] int64 step in the
            trajectory (0: no previous step, rho_tm = 0).
        grid, groups: window layout (``to_windows``). clusters: C per window.

    Returns:
        (merged [B, G * C, D] contiguous, assign [B, G, W] int64, new prev = y contiguous).
    """
    yw = to_windows(y, grid, groups)
    motion = to_windows(temporal_saliency(y, prev, step == 0).unsqueeze(-1), grid, groups).squeeze(-1)
    merged, assign, _, _ = local_ctm(yw, motion, clusters=clusters, k=k, lam=lam)
    b, g, c, d = merged.shape
    return merged.reshape(b, g * c, d).contiguous(), assign, y.contiguous()


def unmerge_add(z: torch.Tensor, coarse_out: torch.Tensor, coarse_in: torch.Tensor, assign: torch.Tensor, *,
                grid, groups: int) -> torch.Tensor:
    """Multi-stage aggregation, one level: H = Z + Unpool(H_out - H_in).

    Args:
        z: the finer stage's output Z[s] [B, N_s, D] (what was merged).
        coarse_out, coarse_in: the coarser stage's (aggregated) output and its merged input
            [B, G * C, D]. assign: [B, G, W] from ``merge_tokens``.

    Returns:
        [B, N_s, D]. Departs from the paper's H_agg + Z[s] (which adds the unpooled coarse
        output itself): adding the unpooled *change* keeps the residual stream's scale, and a
        coarse stage that changes nothing returns exactly Z[s].
    """
    b, n, d = z.shape
    dy = (coarse_out - coarse_in).reshape(b, groups, -1, d)
    w = assign.shape[-1]
    up = dy.gather(2, assign.unsqueeze(-1).expand(b, groups, w, d))
    return z + from_windows(up, grid)


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
