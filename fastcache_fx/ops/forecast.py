"""Residual forecasting and the measured-error decision rule, as tensor functions of the graph.

``approx="taylor"``: an approximated block returns H + R_hat(t), where R_hat extrapolates the
residuals R_j = Y_j - H_j of the block's last m + 1 full computations (taken at timesteps t_j,
newest first) to this step's timestep t. TaylorSeer (Liu et al., arXiv 2503.06923, eq. 7:
F(x_{t-k}) ~ F(x_t) + sum_i Delta^i F(x_t) (-k)^i / (i! N^i)) forecasts features with finite
differences over full computations N steps apart. Our full computations are not evenly spaced
(the decision picks them), so the differences are Newton's divided differences in t, and the
forecast is the interpolating polynomial through (t_j, R_j), evaluated at t:

    R_hat(t) = sum_j L_j(t) R_j,   L_j(t) = prod_{i != j} (t - t_i) / (t_j - t_i)

(Lagrange form of the same polynomial: one weighted sum, no stored differences). For m = 1 it
is TaylorSeer's first-order forecast R_0 + (t - t_0) (R_0 - R_1) / (t_0 - t_1); it is exact for
residuals that are polynomials of degree <= m in t. With fewer than m + 1 residuals of this
trajectory (or coinciding timesteps) the order drops; with one, it is residual reuse.

FoCa (Zheng et al., arXiv 2508.16211) treats the cached features as an ODE in t and forecasts with
a BDF2 predictor and a Heun corrector. Without a model evaluation at the forecast step, the slope
there can only be the last measured one, G_0 = (R_0 - R_1) / (t_0 - t_1). Then the variable-step
BDF2 predictor (h = t - t_0, w = h / (t_0 - t_1))

    P = ((1 + w)^2 R_0 - w^2 R_1 + (1 + w) h G_0) / (1 + 2 w) = R_0 + h G_0

and Heun's corrector R_0 + h/2 (G_0 + (P - R_0) / h) = R_0 + h G_0 both equal the order-1 forecast
(tests/test_forecast.py checks it on uneven steps); with three stored residuals any such rule
exact on quadratics in t is the order-2 forecast (the linear functional of three values exact on
degree <= 2 is unique). So a predictor-corrector on the stored residuals adds nothing to this
family; compare.py's ``fastcache_step_taylor2`` row measures order 2 against order 1 at the step
level (benchmarks/RESULTS.md, "The span forecast's order, the bfloat16 state, and the video
reference model").

``decision="error"``: at every full computation the graph also evaluates what the
approximation would have returned, Y_hat, and measures e = ||Y_hat - Y||_F / ||Y||_F (the error
the approximation would have added to the residual stream, relative to it; per sample, the
largest). e / delta (delta: the block's input change that step) is kept per block as a running
estimate k; a block is approximated iff k delta <= ``error_budget``. One knob in units of output
error instead of input change: the per-block slope k absorbs how sensitive each block (and each
model) is.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .decision import all_finite, sq_sums, sum_over_groups


def taylor_weights(hist_t: torch.Tensor, hist_n: torch.Tensor, t: torch.Tensor, order: int) -> torch.Tensor:
    """Lagrange extrapolation weights [order + 1] of the stored residuals at timestep t.

    Args:
        hist_t: [order + 1] float32, timesteps of the stored residuals, newest first.
        hist_n: [] int64, how many are stored in this trajectory (0 .. order + 1).
        t: [] float32, this step's timestep.

    Returns:
        w [order + 1] float32 with R_hat = sum_j w_j R_j: the highest order m <= min(order,
        hist_n - 1) whose timesteps are distinct; (1, 0, ...) (residual reuse) when m = 0.
    """
    k = order + 1
    t = t.float().reshape(())
    best = (torch.arange(k, device=hist_t.device) == 0).float()  # residual reuse
    for m in range(1, k):
        nodes = hist_t[:m + 1].float()
        diff = nodes.reshape(-1, 1) - nodes.reshape(1, -1)  # t_j - t_i
        eye = torch.eye(m + 1, dtype=torch.bool, device=hist_t.device)
        distinct = (diff.abs() > 1e-6) | eye
        num = torch.where(eye, torch.ones_like(diff), t - nodes.reshape(1, -1))
        den = torch.where(eye, torch.ones_like(diff), torch.where(distinct, diff, torch.ones_like(diff)))
        w = (num / den).prod(dim=1)  # L_j(t)
        ok = (hist_n >= m + 1) & distinct.all() & torch.isfinite(w).all()
        w = torch.cat([w, torch.zeros(k - m - 1, dtype=torch.float32, device=hist_t.device)])
        best = torch.where(ok, w, best)
    return best


def approx_taylor(h: torch.Tensor, residuals: Sequence[torch.Tensor], hist_t: torch.Tensor, hist_n: torch.Tensor,
                  t: torch.Tensor, *, order: int) -> torch.Tensor:
    """``taylor``: H + R_hat(t) (see the module docstring).

    Args:
        h: [B, N, D] block input. residuals: order + 1 tensors [B, N, D], R_0 (the anchor
            residual) first. hist_t [order + 1], hist_n [], t []: as ``taylor_weights``.
    """
    w = taylor_weights(hist_t, hist_n, t, order).to(h.dtype)
    y = h + w[0] * residuals[0]
    for j in range(1, order + 1):
        y = y + w[j] * residuals[j]
    return y.contiguous()


def update_history(approx: torch.Tensor, streams, outputs, anchor_res_old, history, hist_t, hist_n, step, t, *,
                   order: int):
    """Shift the residual history after a finite full computation (a new trajectory restarts it).

    Args:
        history: per stream the older residuals [R_1 .. R_order] (R_0 is the anchor residual,
            updated by ``decision.update_state``); anchor_res_old: per stream R_0 before this step.

    Returns:
        (new history per stream, new hist_t [order + 1], new hist_n []).
    """
    store = torch.logical_not(approx) & all_finite(list(streams) + list(outputs))
    new_hist = []
    for r0, hist in zip(anchor_res_old, history):
        older = [r0] + list(hist[:-1])
        new_hist.append([torch.where(store, o, r).contiguous() for o, r in zip(older, hist)])
    shifted = torch.cat([t.float().reshape(1), hist_t[:-1]])
    new_t = torch.where(store, shifted, hist_t).contiguous()
    fresh = (step == 0)
    grown = torch.clamp(hist_n + 1, max=order + 1)
    new_n = torch.where(store, torch.where(fresh, torch.ones_like(hist_n), grown),
                        torch.where(fresh, torch.zeros_like(hist_n), hist_n))
    return new_hist, new_t, new_n


def history_finite(history) -> torch.Tensor:
    """[] bool: every stored residual is finite (a non-finite one forces a full computation)."""
    return all_finite([r for hist in history for r in hist])


def error_sums(y_hat: Sequence[torch.Tensor], y: Sequence[torch.Tensor], weights: Sequence[float] | None = None):
    """Per-sample (||Y_hat - Y||^2, ||Y||^2) summed over the streams: two [B] float32.

    ``weights``: one factor per stream (context parallelism: k / M, ``passes.shards.sum_weights``,
    so that the all-reduced sums count every element of the whole sequence once); None: all 1."""
    err = sq_sums([a.float() - b.float() for a, b in zip(y_hat, y)], weights)
    ref = sq_sums(y, weights)
    return err, ref


def zero_error_sums(h: torch.Tensor):
    """What the approximation branch returns in place of ``error_sums`` (nothing measured)."""
    z = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device)
    return z, z.clone()


#: the relative block error that counts as none when the block's input equals its anchor: float32
#: rounding of H + (Y_a - H_a) against Y_a is ~1e-7; Inductor's reordering adds a little
UNCHANGED_ERROR = 1e-5


def update_error_estimate(approx, err2, ref2, delta, step, estimate, last, *, groups: Sequence[str] = (),
                          verify: bool = False):
    """After a step: the measured error e and the running estimate k of e / delta.

    A measurement is taken at a full computation of a step >= 1 of the trajectory (an anchor of
    this trajectory exists) with finite e and delta > 0, or delta = 0 and e <= ``UNCHANGED_ERROR`` (ratio 0): e = sqrt(max_b err2_b / ref2_b) (sums
    all-reduced over ``groups`` under context parallelism); k becomes e / delta at the first
    measurement, then the mean of the previous k and the new ratio (recent steps weigh most:
    the slope drifts along the trajectory). ``verify`` (``decision="output"``): a ratio above k
    replaces it at once (``output_error.tighten``).

    Returns:
        (new estimate [] float32 (NaN before any measurement), e [] float32 (NaN if not measured)).
    """
    if groups:
        err2, ref2 = sum_over_groups(torch.stack([err2, ref2]), groups).unbind(0)
    e = (err2 / ref2).max().sqrt()
    # an input equal to its anchor (delta = 0) whose output came out equal too (e at rounding level:
    # H + (Y_a - H_a) differs from Y_a by float32 rounding) measures k = 0: a block whose input never
    # changes (Z-Image's text refiner: no timestep input) would otherwise keep an unknown estimate,
    # and never be approximated, for the whole trajectory
    unchanged = (delta == 0) & (e <= UNCHANGED_ERROR)
    measured = (torch.logical_not(approx) & (step >= 1) & torch.isfinite(e) & torch.isfinite(delta)
                & ((delta > 0) | unchanged))
    ratio = torch.where(delta > 0, e / torch.where(delta > 0, delta, torch.ones_like(delta)), torch.zeros_like(e))
    if verify:
        from .output_error import tighten

        new = tighten(estimate, ratio)
    else:
        new = torch.where(torch.isfinite(estimate), 0.5 * (estimate + ratio), ratio)
    return (torch.where(measured, new, estimate).contiguous(),
            torch.where(measured, e, torch.full_like(e, float("nan"))).contiguous())
