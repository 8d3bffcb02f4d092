"""``approx="residual"``: residual reuse, H_l ~ H_{l-1} + R_anchor (FastCache sec. 3.2, the cached
residual of the block's last full computation added to its current input)."""

from __future__ import annotations

from ..ops import decision as D
from .base import Approximation


class Residual(Approximation):
    """Residual reuse: no weights, no state beyond the anchors every kind keeps."""

    name = "residual"

    def node(self, g, ph, slots, s, config):
        return g.call_function(D.approx_residual, (ph[slots.stream[s]], ph[slots.res[s]]))

    def describe(self, config) -> str:
        return "residual reuse H + R_anchor"


#: the one instance (the fallback of the calibrated kinds)
RESIDUAL = Residual()
