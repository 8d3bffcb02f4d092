"""Token selection's tensor functions (FastCache's motion-aware token selection, the pass
``passes.token_select``): saliency, top-k selection, gather / scatter, the static tokens'
approximation, the reference update."""

from __future__ import annotations

import torch

_EPS = 1e-12



def token_saliency(x: torch.Tensor, x_ref: torch.Tensor) -> torch.Tensor:
    """s[i] = max_b ||x[b, i] - x_ref[b, i]||^2 / mean_j ||x_ref[b, j]||^2: [N] float32 (float64
    for float64 x). x, x_ref: [B, N, D]. Unitless; +inf-free (the mean is floored)."""
    xf = x if x.dtype == torch.float64 else x.float()
    rf = x_ref if x_ref.dtype == torch.float64 else x_ref.float()
    num = (xf - rf).pow(2).sum(-1)
    den = rf.pow(2).sum(-1).mean(-1, keepdim=True)
    return (num / (den + _EPS)).amax(0)


def select_tokens(x: torch.Tensor, x_ref: torch.Tensor, step: torch.Tensor, *, k: int, threshold: float):
    """The motion tokens of one step.

    Args:
        x, x_ref: [B, N, D] image stream and its reference. step: [] int64 step in the
            trajectory (0: no reference yet, every token counts as moving).
        k: tokens to select (1 <= k <= N). threshold: motion_threshold (unitless, >= 0).

    Returns:
        (idx [k] int64 the top-k tokens by saliency in increasing index order, m [] int64 the
        number of tokens with saliency > threshold; N at step 0).
    """
    n = x.shape[1]
    s = token_saliency(x, x_ref)
    m = (s > threshold).sum()
    m = torch.where(step == 0, torch.full_like(m, n), m)
    if k >= n:
        idx = torch.arange(n, device=x.device)
    else:
        idx = s.topk(k).indices.sort().values
    return idx, m


def count_motion(x: torch.Tensor, x_ref: torch.Tensor, step: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """m of ``select_tokens`` without a selection (the 100 % variant): [] int64."""
    return select_tokens(x, x_ref, step, k=x.shape[1], threshold=threshold)[1]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int = 1, offset: int = 0) -> torch.Tensor:
    """x with only the tokens ``idx`` along ``dim`` (contiguous). ``offset`` > 0: the first
    ``offset`` entries of ``dim`` (the text tokens of a joint sequence) are all kept, and idx
    counts from there."""
    if offset:
        idx = torch.cat([torch.arange(offset, device=idx.device, dtype=idx.dtype), idx + offset])
    return x.index_select(dim, idx).contiguous()


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """base [B, N, D] with tokens idx replaced by y [B, k, D] (out of place, contiguous): the
    inverse of ``gather_tokens`` on the selected positions."""
    return base.index_copy(1, idx, y.to(base.dtype)).contiguous()


def complement_tokens(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The N - k token indices not in idx [k] (distinct), increasing: [N - k] int64 (a static
    shape: a stable sort of the membership mask, not a boolean mask)."""
    member = torch.zeros(n, dtype=torch.int8, device=idx.device).index_fill(0, idx, 1)
    return torch.sort(member, stable=True).indices[: n - idx.shape[0]]


def approx_static(x: torch.Tensor, x_ref: torch.Tensor, y_ref: torch.Tensor, idx: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor, *, mode: str) -> torch.Tensor:
    """y_ref [B, N, D] with the static tokens (not in idx [k]) replaced by their approximation:
    ``mode`` "linear": X W^T + b; "cached_linear": Y_ref + (X - X_ref) W^T + b (FastCache sec.
    3.1; the module doc). x, x_ref: [B, N, D]; weight [D, D], bias [D] float32 (computed in
    float32, returned in y_ref's dtype). The motion tokens keep y_ref (``scatter_tokens``
    overwrites them)."""
    sidx = complement_tokens(idx, x.shape[1])
    xs = x.index_select(1, sidx).float()
    if mode == "linear":
        ys = torch.nn.functional.linear(xs, weight.float(), bias.float())
    else:
        dx = xs - x_ref.index_select(1, sidx).float()
        ys = y_ref.index_select(1, sidx).float() + torch.nn.functional.linear(dx, weight.float(), bias.float())
    return y_ref.index_copy(1, sidx, ys.to(y_ref.dtype)).contiguous()


def changed_set(idx: torch.Tensor, idx_prev: torch.Tensor) -> torch.Tensor:
    """[] bool: the token set differs from the previous step's (idx_prev = -1: none yet)."""
    return (idx != idx_prev).any()


def force_full_if(changed: torch.Tensor, force: torch.Tensor) -> torch.Tensor:
    """The block cache's force control [L] int8, with 0 (compute fully) everywhere when
    ``changed``: a block-cache anchor of other tokens must not be reused."""
    return torch.where(changed, torch.zeros_like(force), force)


def update_reference(x: torch.Tensor, x_ref: torch.Tensor, idx: torch.Tensor, anchor: bool) -> torch.Tensor:
    """The new X_ref: ``anchor``: x at the computed tokens idx, x_ref elsewhere; else x."""
    if not anchor or idx.shape[0] == x.shape[1]:
        return x.contiguous()
    return x_ref.index_copy(1, idx, x.index_select(1, idx)).contiguous()
