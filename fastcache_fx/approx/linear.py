"""``approx="linear"``: H_l ~ W_l H_{l-1} + b_l per token, the paper's learnable linear
approximation (FastCache, arXiv 2505.20353, sec. 3.2, eq. 6), W fitted by ridge regression."""

from __future__ import annotations

from ..ops import decision as D
from .calibrated import CalibratedMap


class Linear(CalibratedMap):
    """The full map W H + b; low rank W = I + U V^T; per time bucket; or fitted online."""

    name = "linear"

    def node(self, g, ph, slots, s, config):
        if config.rank is None and config.time_buckets == 1 and not self._online(slots):
            w, b = slots.kind["maps"][s]
            return g.call_function(D.approx_linear, (ph[slots.stream[s]], ph[w], ph[b]))
        return super().node(g, ph, slots, s, config)

    def describe(self, config) -> str:
        return "calibrated linear map W H + b (FastCache eq. 6)"
