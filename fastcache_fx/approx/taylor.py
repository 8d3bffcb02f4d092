"""``approx="taylor"``: H + R_hat(t), the residuals of the block's last m + 1 full computations
extrapolated in t (TaylorSeer, arXiv 2503.06923, eq. 7, as Lagrange interpolation in t:
``ops.forecast``)."""

from __future__ import annotations

import torch

from ..ops import forecast
from .base import Approximation, meta


class Taylor(Approximation):
    """Per block: R_1 .. R_m per stream (R_0 is the anchor residual), their timesteps and count."""

    name = "taylor"
    reads_t = True

    def add_inputs(self, io, block, metas, config):
        m = config.taylor_order
        hist = [[io.state(f"{block}.res_hist.{s}.{j}", shape, config.store_dtype(dtype), 0.0) for j in range(1, m + 1)]
                for s, (shape, dtype) in enumerate(metas)]
        return {"hist": hist, "hist_t": io.state(f"{block}.hist_t", (m + 1,), torch.float32, float("nan")),
                "hist_n": io.state(f"{block}.hist_n", (), torch.int64, 0)}

    def take_operands(self, handles, take):
        history = [take(h) for h in handles["hist"]]
        hist_t, hist_n = take([handles["hist_t"], handles["hist_n"]])
        return {"history": history, "hist_t": hist_t, "hist_n": hist_n}

    def decision_kwargs(self, cur, handles):
        # a non-finite stored residual forces a full computation
        return {"history_ok": cur.call(forecast.history_finite, handles["hist"], val=meta((), torch.bool))}

    def node(self, g, ph, slots, s, config):
        k = slots.kind
        residuals = [ph[slots.res[s]]] + [ph[i] for i in k["history"][s]]
        return g.call_function(forecast.approx_taylor, (ph[slots.stream[s]], residuals, ph[k["hist_t"]],
                                                        ph[k["hist_n"]], ph[slots.t]), {"order": config.taylor_order})

    def update(self, cur, handles, ok, streams, outs, anchor_res, step, t, extras, config):
        m, hist = config.taylor_order, handles["hist"]
        new_hist, new_t, new_n = cur.unpack(cur.call(
            forecast.update_history, ok, streams, outs, anchor_res, hist, handles["hist_t"],
            handles["hist_n"], step, t, order=m), 3)
        return ([(hist[s][j], cur.get(cur.get(new_hist, s), j)) for s in range(len(streams)) for j in range(m)]
                + [(handles["hist_t"], new_t), (handles["hist_n"], new_n)])

    def stream_tensors(self, config) -> int:
        return super().stream_tensors(config) + config.taylor_order

    def describe(self, config) -> str:
        return f"Taylor forecast of the residual in t, order {config.taylor_order}"
