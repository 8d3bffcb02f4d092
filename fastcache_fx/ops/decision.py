"""The block decision and the block approximations, as tensor functions called from the graph.

``passes/block_cache.py`` inserts ``call_function`` nodes targeting these functions; AOTAutograd
traces through them, so they become ordinary ops of the compiled graph (no graph break, no
host sync besides the ``torch.cond`` predicate itself).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from .. import torch_compat


@functools.lru_cache(maxsize=None)
def chi2_quantile_ratio(significance_level: float, dof: int) -> float:
    """chi2.ppf(1 - alpha, ND) / ND from scipy, cached per (alpha, ND).

    Under H0 "the change of the block input is isotropic noise of relative size tau",
    ||dH||^2 / sigma^2 ~ chi2(ND), so delta^2 <= tau^2 * chi2.ppf(1 - alpha, ND) / ND accepts H0
    at level alpha (FastCache, arXiv 2505.20353, sec. 3.2; tau made explicit: docs/advanced.md "The chi-square rule").
    """
    from scipy.stats import chi2

    if dof < 1:
        raise ValueError(f"dof: expected >= 1, got {dof}")
    return float(chi2.ppf(1.0 - significance_level, dof) / dof)


def threshold_sq(cache_ratio_threshold: float, significance_level: float, dof: int) -> float:
    """The squared bound on delta: tau^2 * chi2.ppf(1 - alpha, ND) / ND (ND = ``dof``)."""
    return cache_ratio_threshold ** 2 * chi2_quantile_ratio(significance_level, dof)


def trajectory_step(timestep: torch.Tensor | None, prev_t: torch.Tensor, step: torch.Tensor,
                    t_first: torch.Tensor | None = None):
    """Advance the step counter, or start a new trajectory.

    With ``t_first`` (the timestep at the trajectory's step 0) the rule follows the trajectory's
    own direction: a trajectory continues while its timestep keeps moving the way its first two
    steps went (falling for most samplers, rising for Lumina, Lumina 2 and Z-Image, whose
    pipelines pass 1 - sigma); it starts over when the timestep repeats or turns back. Without
    ``t_first`` (the token-selection pass's own clock) it starts over when the timestep stops
    decreasing.

    Args:
        timestep: the model's timestep input (any shape, first element used), or None / NaN
            when the graph does not know it (the step then advances by one, t stays).
        prev_t: [] float32, the previous step's timestep (-inf before the first step).
        step: [] int64, steps since the trajectory started (-1 before the first step).
        t_first: [] float32, the timestep of the trajectory's step 0, or None.

    Returns:
        (step [] int64, t [] float32) and, with ``t_first``, the new t_first [] float32.
    """
    if timestep is None:
        return (step + 1, prev_t.clone()) + (() if t_first is None else (t_first.clone(),))
    t = timestep.reshape(-1)[0].to(torch.float32, copy=True)  # never a view of the input: cond refuses aliased operands
    if t_first is None:
        new_traj = torch.logical_not(t < prev_t)
    else:
        going = torch.sign(prev_t - t_first)  # 0 at step 0: any change continues
        new_traj = (step < 0) | (t == prev_t) | ((step >= 1) & (torch.sign(t - prev_t) != going))
    # NaN: unknown (the "timestep" control of a graph without the input, not filled): as None
    known = torch.logical_not(torch.isnan(t))
    new_traj = known & new_traj
    out = (torch.where(new_traj, torch.zeros_like(step), step + 1), torch.where(known, t, prev_t))
    if t_first is None:
        return out
    return out + (torch.where(new_traj, t, t_first),)


def starts_trajectory(t: float, prev_t: float, step: int, t_first: float) -> bool:
    """``trajectory_step``'s rule with ``t_first``, on host floats (``runtime.regional``'s clock)."""
    if step < 0 or t == prev_t:
        return True
    if step == 0:
        return False
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    return sign(t - prev_t) != sign(prev_t - t_first)


class TrajectoryTracker:
    """``starts_trajectory`` per key (a CFG context) on host floats, for hooks that see the
    model's timestep (the calibration collectors)."""

    def __init__(self) -> None:
        self._c: dict = {}  # key -> [prev_t, step, t_first]

    def new(self, key, t: float) -> bool:
        """Record timestep ``t`` of ``key``'s next call; True when it starts a trajectory."""
        prev_t, step, first = self._c.get(key, (float("-inf"), -1, float("nan")))
        start = starts_trajectory(t, prev_t, step, first)
        self._c[key] = (t, 0 if start else step + 1, t if start else first)
        return start


def block_decision(
    streams: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    step: torch.Tensor,
    consecutive: torch.Tensor,
    t: torch.Tensor,
    *,
    q_ratio: float | torch.Tensor,
    tau: float,
    beta: tuple[float, float, float, float] | None,
    timestep_max: float,
    min_step: int,
    max_consecutive: int,
    enabled: bool,
    force: torch.Tensor | None = None,
    groups: Sequence[str] = (),
    history_ok: torch.Tensor | None = None,
    error_per_delta: torch.Tensor | None = None,
    error_budget: float | None = None,
    stream_weights: Sequence[float] | None = None,
    output_gain: torch.Tensor | None = None,
    spent: torch.Tensor | None = None,
):
    """Decide whether a block may be approximated this step (all its streams together).

    delta^2 = max over samples b of sum_s ||H_s[b] - A_s[b]||^2 / sum_s ||A_s[b]||^2, compared with
    tau^2 * q_ratio (q_ratio = chi2.ppf(1 - alpha, ND) / ND; a [] tensor in graphs with symbolic
    shapes, where ND is known only at call time). With ``beta`` the threshold is the
    reference code's adaptive tau(t) = b0 + b1 delta + b2 t_norm + b3 t_norm^2.
    NaN/Inf inputs or an empty anchor make delta non-finite, which always means "compute fully".

    Args:
        streams: stream inputs H_s [B, N_s, D_s]; refs: anchors A_s of the same shapes.
        step: [] int64 step in trajectory; consecutive: [] int64 approximations in a row.
        force: optional [] int8 override (trace replay): -1 decides as above, 0 computes fully,
            1 approximates whenever an anchor exists (step >= 1 and delta finite), ignoring the
            threshold, warmup, the consecutive limit and ``enabled``.
        groups: process-group names the graph's collectives use (context parallelism, where
            each rank holds a shard of the tokens): the per-sample sums are all-reduced over
            them (``sum_over_groups``), so every rank takes the branch one process would take
            on the whole sequence. ND (``q_ratio``) is then that of the whole sequence too
            (``passes.block_cache``: the shard's elements times the ranks its tokens are split
            over, ``passes.shards.token_shards``).
        stream_weights: context parallelism: stream s's local sums are multiplied by k_s / M
            before the all-reduce (``passes.shards.sum_weights``; k_s: the ranks its tokens are
            split over, 1 for a text stream replicated on every rank; M: the multiplicity of
            ``sum_over_groups``), so that the all-reduced sums count every element of the whole
            sequence once and equal one process's sums. None: the plain sums (one process).
        history_ok: [] bool (``approx="taylor"``): the stored residuals are finite; False forces a
            full computation (folded into the sums, so that all ranks agree).
        error_per_delta, error_budget: ``decision="error"``: the block's estimate k of e / delta
            ([] float32, NaN before its first measurement) and the budget; the bound on delta is
            then error_budget / k (``ops.forecast``), replacing tau and the chi-square test.
        output_gain, spent: ``decision="output"`` ([] float32 each): the gain g from stream to
            output error and the budget already spent in this run of steps A + sum_{j<l} p_j;
            the bound on delta is then (error_budget - spent) / (g k) (``ops.output_error``).

    Returns:
        (approx [] bool, delta [] float32, threshold [] float32 = sqrt of the squared bound).
    """
    diff2 = sq_sums([h.float() - a.float() for h, a in zip(streams, refs)], stream_weights)
    ref2 = sq_sums(refs, stream_weights)
    if history_ok is not None:
        diff2 = diff2 + torch.where(history_ok, 0.0, float("inf"))
    if groups:  # context parallelism: the sums over the whole sequence, identical on every rank
        diff2, ref2 = sum_over_groups(torch.stack([diff2, ref2]), groups).unbind(0)
    d2 = (diff2 / ref2).max()
    delta = d2.sqrt()
    thr2 = _bound_sq(d2, delta, t, q_ratio, tau, beta, timestep_max, error_per_delta, error_budget,
                     output_gain, spent)
    ok = (d2 <= thr2) & (step >= min_step) & (consecutive < max_consecutive)
    if not enabled:
        ok = ok & False
    if force is not None:
        forced = (force > 0) & (step >= 1) & torch.isfinite(delta)
        ok = torch.where(force < 0, ok, forced)
    return ok, delta, thr2.sqrt()


def _bound_sq(d2, delta, t, q_ratio, tau, beta, timestep_max, error_per_delta, error_budget, output_gain=None,
              spent=None) -> torch.Tensor:
    """The squared bound on delta (``block_decision``): ((error_budget - spent) / (g k))^2 under the
    output rule, (error_budget / k)^2 under the error rule, tau^2 q_ratio under the chi-square
    rule, tau(t)^2 q_ratio with the adaptive ``beta``."""
    if isinstance(q_ratio, torch.Tensor):  # symbolic shapes: the runtime passes it per call
        q_ratio = q_ratio.to(d2.dtype)
    if output_gain is not None:
        left = (error_budget - spent.to(d2.dtype)).clamp_min(0.0)
        return (left / (error_per_delta.to(d2.dtype) * output_gain.to(d2.dtype))).pow(2)
    if error_per_delta is not None:
        return (error_budget / error_per_delta.to(d2.dtype)).pow(2)
    if beta is None:
        return torch.full_like(d2, tau * tau) * q_ratio
    tn = t / timestep_max
    tau_t = (beta[0] + beta[1] * delta + beta[2] * tn + beta[3] * tn * tn).clamp_min(0.0)
    return tau_t * tau_t * q_ratio


def sq_sums(xs: Sequence[torch.Tensor], weights: Sequence | None = None) -> torch.Tensor:
    """sum_s w_s ||x_s[b]||^2 per sample b: [B] float32 from tensors x_s [B, N_s, ...].

    ``weights`` (context parallelism, ``passes.shards.sum_weights``): one entry per tensor, a
    float (every element of x_s weighs it) or a tuple of N_s floats, one per token along dim 1
    (a tensor whose token segments are split over different numbers of ranks); None: all 1."""
    out = None
    for s, x in enumerate(xs):
        x2 = x.float().pow(2)
        w = None if weights is None else weights[s]
        if isinstance(w, tuple):
            v = (x2.flatten(2).sum(2) * torch.tensor(w, dtype=torch.float32, device=x.device)).sum(1)
        else:
            v = x2.flatten(1).sum(1)
            v = v if w is None else v * w
        out = v if out is None else out + v
    return out


def sum_over_groups(x: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """All-reduce (sum) ``x`` over each process group in turn, as functional collectives traced
    into the graph (no graph break, no host sync).

    Summing over every group the graph's collectives use gives each rank c * (the sum over all
    ranks of the mesh) with the same c on every rank and for every element: over the axes of a
    device mesh (Ulysses x ring) the sums compose to the whole mesh, and a sum over a group whose
    ranks already hold equal values multiplies by the group size, so a value replicated on every
    rank comes back times M, the product of the groups' sizes. The callers scale each tensor's
    local sums by k / M (``passes.shards.sum_weights``) first: the result is then the sum over the
    whole sequence, every element counted once. Cost: one
    all-reduce of ``x.numel()`` float32 per group.
    """
    for g in groups:
        x = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", g))
    return x


def fixed_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with contiguous strides that Inductor may not change: a cond operand.

    Inductor (torch 2.13, ``ir.Conditional.create``) realizes cond operands without requiring the
    strides the branches were traced with (``while_loop`` does require them), so a ``.contiguous()``
    fused into a neighbouring kernel can keep its input's transposed layout (Wan's patch embedding
    ends in ``flatten(2).transpose(1, 2)``) and the branch's stride assertion fails at run time.
    ``inductor_force_stride_order`` fixes the layout (a no-op for an already contiguous tensor in
    eager, a copy otherwise). The prim has no autograd formula: a graph traced with gradients
    (parameters that require grad, outside ``torch.no_grad``) gets ``.contiguous()``. Shape and
    dtype: those of ``x``."""
    if x.requires_grad:
        return x.contiguous()
    return torch_compat.force_contiguous(x)


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


# learned maps: low rank, time buckets, online statistics ------------------------------------------

def pick_bucket(w: torch.Tensor, t: torch.Tensor, buckets: int, timestep_max: float) -> torch.Tensor:
    """The map of this step's time bucket: w [K, ...] -> w[k], k = clamp(floor(K t / timestep_max),
    0, K - 1), with tensor ops (no host sync, no graph break); ``buckets`` 1 returns ``w``."""
    if buckets == 1:
        return w
    k = torch.clamp(torch.floor(t.float() * (buckets / timestep_max)), 0, buckets - 1).to(torch.int64)
    return torch.index_select(w, 0, k.reshape(1)).squeeze(0)


def approx_map(h, residual, anchor_in, maps: Sequence[torch.Tensor], t, ready, *, kind: str, rank: int | None,
               buckets: int, timestep_max: float) -> torch.Tensor:
    """A learned approximation of the block output, for every map form.

    ``maps``: (weight [D, D], bias [D]) or, low rank, (u [D, r], v [D, r], bias [D]), each with a
    leading [K] when ``buckets`` K > 1 (picked from the timestep t [] by ``pick_bucket``).
    - kind "linear": full W H + b (FastCache eq. 6); low rank H + (H V) U^T + b (W = I + U V^T),
      O(N D r) instead of O(N D^2).
    - kind "residual_linear": H + R_anchor + C (H - H_anchor) + b, C = W or U V^T.
    ``t``: None when ``buckets`` is 1 (nothing reads it then). ``ready`` (None, or [] / [K] float
    0/1 with online calibration): where the map is not ready yet, residual reuse H + R_anchor is
    used instead.
    """
    ms = [pick_bucket(m, t, buckets, timestep_max).to(h.dtype) for m in maps]
    x = h if kind == "linear" else h - anchor_in
    if rank is None:
        corr = torch.nn.functional.linear(x, ms[0], ms[1])
        y = corr if kind == "linear" else h + residual + corr
    else:
        corr = (x @ ms[1]) @ ms[0].transpose(0, 1) + ms[2]
        y = h + corr if kind == "linear" else h + residual + corr
    if ready is not None:
        r = pick_bucket(ready, t, buckets, timestep_max)
        y = torch.where(r > 0, y, h + residual)
    return y.contiguous()


def ridge_increments(h, y, anchor_in, anchor_res, *, kind: str):
    """The ridge sufficient-statistic increments of one full computation of one stream (online
    calibration): x, target pairs are (H, Y) for ``linear`` and (H - H_anchor, (Y - H) - R_anchor)
    for ``residual_linear`` (see ``calibration``). float32 matmuls, O(B N D^2).

    Returns:
        (n [], sum x [D], sum y [D], X^T X [D, D], X^T Y [D, D], sum ||y||^2 []), float32.
    """
    x, tgt = h.float(), y.float()
    if kind == "residual_linear":
        x = x - anchor_in.float()
        tgt = (tgt - h.float()) - anchor_res.float()
    x = x.reshape(-1, x.shape[-1])
    tgt = tgt.reshape(-1, tgt.shape[-1])
    n = torch.full((), float(x.shape[0]), dtype=torch.float32, device=x.device)
    return (n, x.sum(0), tgt.sum(0), (x.T @ x).contiguous(), (x.T @ tgt).contiguous(), (tgt * tgt).sum())


def zero_increments(h):
    """What the approximation branch returns instead of ``ridge_increments`` (nothing learned)."""
    d = h.shape[-1]
    z = lambda *s: torch.zeros(*s, dtype=torch.float32, device=h.device)
    return (z(()), z(d), z(d), z(d, d), z(d, d), z(()))


def accumulate(acc: Sequence[torch.Tensor], inc: Sequence[torch.Tensor], store: torch.Tensor, t: torch.Tensor,
               buckets: int, timestep_max: float):
    """acc_i [K, ...] (float64) + inc_i in this step's bucket, where ``store`` ([] bool: the block
    was computed fully, its values are finite, and for residual_linear an anchor of this
    trajectory exists); otherwise acc unchanged. O(K D^2) per stream."""
    k = torch.clamp(torch.floor(t.float() * (buckets / timestep_max)), 0, buckets - 1).to(torch.int64)
    onehot = (torch.arange(buckets, device=store.device) == k) & store  # [K] bool
    out = []
    for a, i in zip(acc, inc):  # where, not a product with a 0/1 mask: a NaN increment must not leak
        m = onehot.reshape((buckets,) + (1,) * i.dim())
        out.append(torch.where(m, a + i.to(torch.float64).unsqueeze(0), a).contiguous())
    return out


def learn_mask(approx: torch.Tensor, streams, outputs, step: torch.Tensor, kind: str) -> torch.Tensor:
    """[] bool: this step's pairs enter the online statistics (a finite full computation; for
    residual_linear also an anchor of this trajectory, step >= 1)."""
    m = torch.logical_not(approx) & all_finite(list(streams) + list(outputs))
    return m & (step >= 1) if kind == "residual_linear" else m
