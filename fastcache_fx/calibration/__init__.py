"""Offline calibration of the linear block maps by ridge regression (FastCache eq. 6).

``calibrate(model, run_fn)`` hooks every block of the *uncompiled* model, lets ``run_fn`` run a
few trajectories, and accumulates per block and stream the sufficient statistics of
(input token x [D], output token y [D]) pairs in float64: n, sum x, sum y, X^T X, X^T Y
(memory O(D^2) per stream; tokens are never stored). The fit is closed-form ridge regression on
centred data (Hastie, Tibshirani, Friedman, ESL sec. 3.4.1):

    W^T = (Cxx + lambda I)^-1 Cxy,   b = mean_y - W mean_x,
    Cxx = X^T X - n mean_x mean_x^T,  Cxy = X^T Y - n mean_x mean_y^T,

with lambda chosen by generalized cross-validation (Golub, Heath, Wahba 1979) on a log grid,
from the eigendecomposition Cxx = V diag(e) V^T alone (see ``RidgeStats.solve``).

What is fitted (``kind``), matching ``ops.decision``:
- ``linear``: y = W x + b, the block output from its input (``approx_linear``: H_l ~ W H + b,
  FastCache eq. 6), fitted as W = I + C on the residual r = y - x: the ridge penalty shrinks C
  toward 0, so with too few samples (n < D) the map degrades to H + mean residual (residual
  reuse) instead of to garbage.
- ``residual_linear``: on consecutive calls t-1, t of a block in one trajectory and context
  (consecutive *full* computations, as the runtime's anchor is the last full computation),
  dX = x_t - x_{t-1}, dY = y_t - y_{t-1}; the issue's dY = W' dX is fitted as W' = I + C with
  dR = dY - dX = C dX + b, because ``approx_residual_linear`` computes
  H + R_anchor + C (H - H_anchor) + b = Y_anchor + dX + C dX + b. Prior C = 0: residual reuse.
  A new trajectory starts when the model's ``timestep`` repeats or turns back (the runtime's rule,
  ``ops.decision.starts_trajectory``);
  calls under different ``fastcache_fx.cache_context`` names are not paired.
- ``rank=r``: C = U V^T (reduced-rank regression, ``RidgeStats.solve``), applied as
  h + (h V) U^T + b in O(N D r).
- ``time_buckets=K``: one map per bucket k = floor(K t / timestep_max) of the model's timestep.
- ``stack_linear`` / ``stack_cached_linear`` (``calibrate_stack``): one map of the whole block
  stack on the image stream, for token selection's ``static_approx="linear"`` (y = W x + b,
  x entering the first block, y leaving the last) and ``"cached_linear"`` (dY = W dX + b over
  consecutive model calls of one trajectory and context); both with the identity-plus-residual
  prior. Stored as "stack.weight.0" [D, D] (the full W) and "stack.bias.0" [D] with a ``stack``
  metadata entry, in a file of that ``kind`` or added to a file of block maps (``merge_stack``),
  so one file can serve ``approx`` and ``static_approx``; ``load_stack_map`` reads it.

Streams: a block's output streams are ordered canonically by token count N, largest first (the
image stream is stream 0 when N_img > N_txt; on a tie ``hidden_states`` comes first). The graph
pass orders streams in graph order instead; ``load_calibration`` maps one onto the other by
(N, D), then by rank of N (another resolution), checking the width D.

File format: safetensors, float32 tensors "<block>.weight.<s>" [D_out, D_in] (out x in, the
``torch.nn.functional.linear`` convention) and "<block>.bias.<s>" [D_out], or with a rank
"<block>.u.<s>" [D_out, r], "<block>.v.<s>" [D_in, r] and the bias; with K > 1 time buckets
every tensor has a leading [K]. The safetensors metadata holds JSON strings (see ``Calibration``).
"""

from .collect import CalibrationStats, block_modules, collect_stats, model_info, stream_pairs, time_bucket
from .file import FORMAT, FORMAT_VERSION, KINDS, Calibration, load, load_calibration, save
from .fit import calibrate, fit_calibration
from .ridge import GCV_GRID, RIDGE_RELATIVE, RidgeFit, RidgeStats
from .stack import STACK_BIAS, STACK_KINDS, STACK_WEIGHT, calibrate_stack, collect_stack_stats, fit_stack, load_stack_map, merge_stack

__all__ = ["CalibrationStats", "Calibration", "FORMAT", "FORMAT_VERSION", "GCV_GRID", "KINDS", "RIDGE_RELATIVE",
           "RidgeFit", "RidgeStats", "STACK_BIAS", "STACK_KINDS", "STACK_WEIGHT", "block_modules", "calibrate", "calibrate_stack",
           "collect_stack_stats", "collect_stats", "fit_calibration", "fit_stack", "load", "load_calibration",
           "load_stack_map", "merge_stack", "model_info", "save", "stream_pairs", "time_bucket"]
