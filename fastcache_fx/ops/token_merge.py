"""The token-merge pyramid's tensor functions (FastCache v3 multi-stage token merging; the pass
``passes.token_merge``, whose docstring has the formulas): windows, local clustering,
merge and unmerge."""

from __future__ import annotations


import torch

# mean k-NN distance (normalised) is clamped here so that exp(-x) stays a normal float32
_MAX_EXPONENT = 50.0



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
