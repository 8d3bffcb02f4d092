"""The block decision and the block approximations, as tensor functions called from the graph.

``passes/block_cache.py`` inserts ``call_function`` nodes targeting these functions; AOTAutograd
traces through them, so they become ordinary ops of the compiled graph (no graph break, no
host sync besides the ``torch.cond`` predicate itself).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch


@functools.lru_cache(maxsize=None)
def chi2_quantile_ratio(significance_level: float, dof: int) -> float:
    """chi2.ppf(1 - alpha, ND) / ND from scipy, cached per (alpha, ND).

    Under H0 "the change of the block input is isotropic noise of relative size tau",
    ||dH||^2 / sigma^2 ~ chi2(ND), so delta^2 <= tau^2 * chi2.ppf(1 - alpha, ND) / ND accepts H0
    at level alpha (FastCache, arXiv 2505.20353, sec. 3.2; tau made explicit, DESIGN.md).
    """
    from scipy.stats import chi2

    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    return float(chi2.ppf(1.0 - significance_level, dof) / dof)


def threshold_sq(cache_ratio_threshold: float, significance_level: float, dof: int) -> float:
    """The squared bound on delta: tau^2 * chi2.ppf(1 - alpha, ND) / ND (ND = ``dof``)."""
    return cache_ratio_threshold ** 2 * chi2_quantile_ratio(significance_level, dof)


def trajectory_step(timestep: torch.Tensor | None, prev_t: torch.Tensor, step: torch.Tensor):
    """Advance the step counter; a new trajectory starts when the timestep stops decreasing.

    Args:
        timestep: the model's timestep input (any shape, first element used) or None.
        prev_t: [] float32, the previous step's timestep (-inf before the first step).
        step: [] int64, steps since the trajectory started (-1 before the first step).

    Returns:
        (step [] int64, t [] float32): the new counter and this step's timestep.
    """
    if timestep is None:
        return step + 1, prev_t.clone()
    t = timestep.reshape(-1)[0].to(torch.float32)
    new_traj = torch.logical_not(t < prev_t)
    return torch.where(new_traj, torch.zeros_like(step), step + 1), t


def block_decision(
    streams: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    step: torch.Tensor,
    consecutive: torch.Tensor,
    t: torch.Tensor,
    *,
    q_ratio: float,
    tau: float,
    beta: tuple[float, float, float, float] | None,
    timestep_max: float,
    min_step: int,
    max_consecutive: int,
    enabled: bool,
    force: torch.Tensor | None = None,
):
    """Decide whether a block may be approximated this step (all its streams together).

    delta^2 = max over samples b of sum_s ||H_s[b] - A_s[b]||^2 / sum_s ||A_s[b]||^2, compared with
    tau^2 * q_ratio (q_ratio = chi2.ppf(1 - alpha, ND) / ND). With ``beta`` the threshold is the
    reference code's adaptive tau(t) = b0 + b1 delta + b2 t_norm + b3 t_norm^2.
    NaN/Inf inputs or an empty anchor make delta non-finite, which always means "compute fully".

    Args:
        streams: stream inputs H_s [B, N_s, D_s]; refs: anchors A_s of the same shapes.
        step: [] int64 step in trajectory; consecutive: [] int64 approximations in a row.
        force: optional [] int8 override (trace replay): -1 decides as above, 0 computes fully,
            1 approximates whenever an anchor exists (step >= 1 and delta finite), ignoring the
            threshold, warmup, the consecutive limit and ``enabled``.

    Returns:
        (approx [] bool, delta [] float32, threshold [] float32 = sqrt of the squared bound).
    """
    diff2 = sum((h.float() - a.float()).pow(2).flatten(1).sum(1) for h, a in zip(streams, refs))
    ref2 = sum(a.float().pow(2).flatten(1).sum(1) for a in refs)
    d2 = (diff2 / ref2).max()
    delta = d2.sqrt()
    if beta is None:
        thr2 = torch.full_like(d2, tau * tau * q_ratio)
    else:
        tn = t / timestep_max
        tau_t = (beta[0] + beta[1] * delta + beta[2] * tn + beta[3] * tn * tn).clamp_min(0.0)
        thr2 = tau_t * tau_t * q_ratio
    ok = (d2 <= thr2) & (step >= min_step) & (consecutive < max_consecutive)
    if not enabled:
        ok = ok & False
    if force is not None:
        forced = (force > 0) & (step >= 1) & torch.isfinite(delta)
        ok = torch.where(force < 0, ok, forced)
    return ok, delta, thr2.sqrt()


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[] bool: every element of every tensor is finite (amax propagates NaN)."""
    out = None
    for x in tensors:
        f = torch.isfinite(x.detach().abs().amax().float())
        out = f if out is None else out & f
    return out


def update_state(approx: torch.Tensor, streams, outputs, anchor_in, anchor_res, consecutive):
    """New anchors after a step: stored only after a finite full computation.

    Returns:
        (new anchor inputs, new anchor residuals R = Y - H, new consecutive count), same shapes.
    """
    store = torch.logical_not(approx) & all_finite(list(streams) + list(outputs))
    new_in = [torch.where(store, h, a).contiguous() for h, a in zip(streams, anchor_in)]
    new_res = [torch.where(store, y - h, r).contiguous() for h, y, r in zip(streams, outputs, anchor_res)]
    new_consec = torch.where(approx, consecutive + 1, torch.zeros_like(consecutive))
    return new_in, new_res, new_consec


def update_previous(streams, previous):
    """reference="previous": remember this step's (finite) inputs."""
    ok = all_finite(streams)
    return [torch.where(ok, h, p).contiguous() for h, p in zip(streams, previous)]


def approx_residual(h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual``: H_l ~ H_{l-1} + R_anchor (residual reuse)."""
    return (h + residual).contiguous()


def approx_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``linear``: H_l ~ W_l H_{l-1} + b_l per token (FastCache eq. 6); weight [D, D] (out, in)."""
    return torch.nn.functional.linear(h, weight.to(h.dtype), bias.to(h.dtype)).contiguous()


def approx_residual_linear(h, residual, anchor_in, weight, bias) -> torch.Tensor:
    """``residual_linear``: H_l ~ H + R_anchor + W (H - H_anchor) + b (first-order correction)."""
    dh = h - anchor_in
    return (h + residual + torch.nn.functional.linear(dh, weight.to(h.dtype), bias.to(h.dtype))).contiguous()
