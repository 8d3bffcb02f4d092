"""``approx="residual_linear"``: H_l ~ H + R_anchor + C (H - H_anchor) + b, residual reuse with a
fitted first-order correction in the input change (``ops.decision.approx_map``)."""

from __future__ import annotations

from .calibrated import CalibratedMap


class ResidualLinear(CalibratedMap):
    """Residual reuse plus C (H - H_anchor) + b; C full or low rank, per time bucket, or online."""

    name = "residual_linear"

    def describe(self, config) -> str:
        return "residual reuse + calibrated correction C (H - H_anchor) + b"
