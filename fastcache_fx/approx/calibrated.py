"""What the two calibrated kinds share: per-block maps fitted by ridge regression, from a
calibration file (``calibration=path``, ``fastcache_fx.calibration``) or online while sampling
(``calibration="online"``: the full branch also returns the ridge statistic increments and the
graph accumulates them, ``runtime.online`` refits)."""

from __future__ import annotations

import warnings

import torch

from ..ops import decision as D
from ..ops.maps import ACCUM_KEYS, weight_shapes
from .base import Approximation, meta
from .residual import RESIDUAL


class CalibratedMap(Approximation):
    """Base of ``linear`` and ``residual_linear``: weight inputs W [D, D] / U, V [D, r], b [D]
    per stream (a leading [K] with K time buckets), online: a ``ready`` flag and accumulators."""

    calibrated = True

    def resolve(self, config) -> Approximation:
        if config.calibration is None:
            warnings.warn(f"fastcache: approx={self.name!r} needs a calibration (calibration=path); "
                          "falling back to approx='residual'", stacklevel=5)
            return RESIDUAL
        return self

    def weights(self, config, regions):
        if config.calibration in (None, "online"):  # online: runtime.online provides them
            return {}
        from ..calibration import load_calibration

        return load_calibration(config.calibration, regions, kind=self.name, rank=config.rank,
                                time_buckets=config.time_buckets)

    def add_weights(self, io, block, metas, config, layout):
        nk, online = layout.time_buckets, layout.online
        maps = [[io.weight(f"{block}.{key}.{s}", block, s, key, shape, torch.float32)
                 for key, shape in weight_shapes(m[0][-1], layout.rank, nk).items()] for s, m in enumerate(metas)]
        h = {"maps": maps, "ready": None, "accs": []}
        if online:
            shape = (nk,) if nk > 1 else ()
            h["ready"] = io.weight(f"{block}.ready", block, 0, "ready", shape, torch.float32)
            for s, m in enumerate(metas):
                d = m[0][-1]
                h["accs"].append([io.accum(f"{block}.{key}.{s}", block, s, key, shape, torch.float64)
                                  for key, shape in zip(ACCUM_KEYS, ((nk,), (nk, d), (nk, d), (nk, d, d),
                                                                     (nk, d, d), (nk,)))])
        return h

    def needs_t(self, config, layout) -> bool:
        return layout.time_buckets > 1 or layout.online or layout.rank is not None

    def take_operands(self, handles, take):
        out = {"maps": [take(group) for group in handles.get("maps", [])]}
        if handles.get("ready") is not None:
            out["ready"] = take([handles["ready"]])[0]
        return out

    def _online(self, slots) -> bool:
        return "ready" in slots.kind

    def node(self, g, ph, slots, s, config):
        maps = [ph[i] for i in slots.kind["maps"][s]]
        ready = ph[slots.kind["ready"]] if self._online(slots) else None
        t = ph[slots.t] if slots.t is not None else None  # read only to pick a time bucket
        return g.call_function(D.approx_map, (ph[slots.stream[s]], ph[slots.res[s]], ph[slots.anchor_in[s]], maps,
                                              t, ready),
                               {"kind": self.name, "rank": config.rank, "buckets": config.time_buckets,
                                "timestep_max": config.timestep_max})

    def full_extras(self, g, ph, slots, ys):
        if not self._online(slots):
            return []
        import operator

        outs = []
        for s, y in enumerate(ys):
            inc = g.call_function(D.ridge_increments, (ph[slots.stream[s]], y, ph[slots.anchor_in[s]],
                                                       ph[slots.res[s]]), {"kind": self.name})
            outs += [g.call_function(operator.getitem, (inc, j)) for j in range(len(ACCUM_KEYS))]
        return outs

    def approx_extras(self, g, ph, slots, n):
        if not self._online(slots):
            return []
        import operator

        outs = []
        for s in range(n):
            z = g.call_function(D.zero_increments, (ph[slots.stream[s]],))
            outs += [g.call_function(operator.getitem, (z, j)) for j in range(len(ACCUM_KEYS))]
        return outs

    def update(self, cur, handles, ok, streams, outs, anchor_res, step, t, extras, config):
        if not handles.get("accs"):
            return []
        cond, first = extras
        nk, nkeys = config.time_buckets, len(ACCUM_KEYS)
        learn = cur.call(D.learn_mask, ok, streams, outs, step, self.name)
        new = []
        for s, accs in enumerate(handles["accs"]):
            incs = [cur.get(cond, first + s * nkeys + j, val=meta(acc.meta["val"].shape[1:]))
                    for j, acc in enumerate(accs)]
            acc_new = cur.call(D.accumulate, accs, incs, learn, t, nk, config.timestep_max)
            new += zip(accs, cur.unpack(acc_new, nkeys))
        return new
