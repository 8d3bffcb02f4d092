"""The output-level error budget (``decision="output"``), as tensor functions of the graph.

The budget bounds the relative error of what the sampler consumes, the transformer's output O
(noise or velocity prediction), accumulated over the blocks approximated in a step and over a
run of consecutive steps with approximations:

    p_l = g * k_l * delta_l            predicted output error of approximating block l
    approximate block l  iff  A + sum_{j < l approximated} p_j + p_l <= budget

- k_l delta_l: block l's predicted stream error (``ops.forecast``: k_l, the running e / delta of
  its full computations, e = ||Y_hat - Y|| / ||Y||).
- g: the gain from a relative stream error at the last block to the relative output error,
  measured in the graph: at a full computation of the last block at step >= 1 the output layer
  ("tail": the nodes from the last block to the model's output) is evaluated a second time on
  Y_L + (Y_hat_L - Y_L), and g = (||O' - O|| / ||O||) / e_L. The per-block errors are added
  (first order: each reaches the last block's output through the residual path unchanged, and
  the triangle inequality bounds their sum).
- A: the predicted output error already spent by the current run of steps with approximations
  (a step that approximates nothing, i.e. computes every block fully, ends the run: A = 0).
  Errors of consecutive approximated steps add up in the sampler's trajectory; the budget is
  on their sum, so a run ends with a full step once it is spent.

Two controls let a sampler-aware caller (``runtime.quality``) steer the budget per step without a
recompile: "output.weight" w multiplies every p (the final sample's sensitivity to this step's
output error, in units of the allowed final error) and "output.offset" c is added to A at the
start of the step (the error spent by earlier runs of the trajectory, and the pacing). With
w = 1 and c = 0 (their fills, the bare backend) the rule is the one above.

Verification (SpeCa, arXiv 2509.11628, forecasts then verifies): every full computation measures
the error the approximation would have made; where it exceeds the prediction, the estimate
(k_l, g) takes the measured value at once, and relaxes only halfway toward a smaller one, so the
estimate tightens within the trajectory.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .decision import sq_sums, sum_over_groups


def predicted_error(delta: torch.Tensor, estimate: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """p = g k delta [] float32 (NaN before k or g was measured)."""
    return gain.float() * estimate.float() * delta.float()


def spend(spent: torch.Tensor, approx: torch.Tensor, delta: torch.Tensor, estimate: torch.Tensor,
          gain: torch.Tensor) -> torch.Tensor:
    """The budget spent after a block: ``spent`` + p where the block was approximated ([] float32;
    a NaN p of a computed block never enters)."""
    p = predicted_error(delta, estimate, gain)
    return spent + torch.where(approx, torch.nan_to_num(p, nan=0.0, posinf=0.0), torch.zeros_like(p))


def end_of_step(run_before: torch.Tensor, spent: torch.Tensor, offset: torch.Tensor | None = None):
    """After the last block: (A for the next step, E = this step's predicted output error).

    A = the run's total if the step approximated something, else 0 (a full step ends the run).
    ``offset``: the "output.offset" control the step started from (``run_before`` = A + offset),
    which A does not keep."""
    step_error = (spent - run_before).clamp_min(0.0)
    run = spent if offset is None else spent - offset
    return torch.where(step_error > 0, run, torch.zeros_like(spent)).contiguous(), step_error.contiguous()


def tail_errors(perturbed: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor], groups: Sequence[str] = (),
                weights: Sequence[float] | None = None):
    """e_out = max over samples of ||O' - O|| / ||O|| over the model's output tensors ([] float32).

    ``perturbed``, ``outputs``: the output tensors [B, ...] from the replayed tail and the real one.
    Under context parallelism the per-sample sums, each output's scaled by its entry of ``weights``
    (k / M, ``passes.shards.sum_weights``: an output gathered whole on every rank counts once,
    not once per rank), are all-reduced over ``groups`` (every rank gets the same value;
    ``decision.sum_over_groups``)."""
    err = sq_sums([a.float() - b.float() for a, b in zip(perturbed, outputs)], weights)
    ref = sq_sums(outputs, weights)
    if groups:
        err, ref = sum_over_groups(torch.stack([err, ref]), groups).unbind(0)
    return (err / ref).max().sqrt()


def tighten(estimate: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """The verified running estimate: ``ratio`` if it exceeds ``estimate`` (or none exists), else
    the mean of the two (a smaller measurement relaxes the estimate halfway)."""
    up = torch.logical_not(torch.isfinite(estimate)) | (ratio > estimate)
    return torch.where(up, ratio, 0.5 * (estimate + ratio))


def update_gain(approx_last: torch.Tensor, e_out: torch.Tensor, e_last: torch.Tensor, step: torch.Tensor,
                gain: torch.Tensor) -> torch.Tensor:
    """The new gain g after a step: measured (g = e_out / e_L, ``tighten``ed into the estimate) when
    the last block was computed fully at step >= 1 with finite, positive errors; else unchanged."""
    ok = (torch.logical_not(approx_last) & (step >= 1) & torch.isfinite(e_out) & torch.isfinite(e_last)
          & (e_last > 0))
    ratio = e_out / torch.where(e_last > 0, e_last, torch.ones_like(e_last))
    return torch.where(ok, tighten(gain, ratio), gain).contiguous()
