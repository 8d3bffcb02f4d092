"""Shapes of the tensors the calibrated approximations take (``ops.decision.approx_map``) and of
the ridge statistics online calibration accumulates (``ops.decision.ridge_increments``)."""

from __future__ import annotations

#: the ridge sufficient statistics of one stream: n [K], sum x [K, D], sum y [K, D], X^T X
#: [K, D, D], X^T Y [K, D, D], sum ||y||^2 [K]
ACCUM_KEYS = ("n", "sx", "sy", "xtx", "xty", "yty")


def weight_shapes(d: int, rank: int | None, buckets: int) -> dict[str, tuple]:
    """Shapes of the weight inputs of one stream of width ``d``: weight [D, D] / u, v [D, r] /
    bias [D], with a leading [K] when ``buckets`` K > 1."""
    lead = (buckets,) if buckets > 1 else ()
    shapes = {"weight": (d, d), "bias": (d,)} if rank is None else {"u": (d, rank), "v": (d, rank), "bias": (d,)}
    return {k: lead + v for k, v in shapes.items()}
