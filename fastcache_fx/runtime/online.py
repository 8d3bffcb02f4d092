"""Online calibration (``calibration="online"``): refit the linear block maps while sampling.

The rewritten graph accumulates, for every fully computed block, the ridge sufficient statistics
of its (input, output) token pairs (``decision.ridge_increments`` inside the full branch of the
block's cond, added to float64 accumulators by ``decision.accumulate``: no graph break, no host
sync per block). This object carries those accumulators between calls (one set per compiled
graph, shared by the CFG contexts, kept across ``reset()``), and every ``refit_every`` calls
reads the sample counts once (one host sync), refits the blocks with at least ``refit_every``
new full computations and ``online_min_samples`` token pairs (``RidgeStats.solve``: GCV ridge,
identity-plus-residual prior, optional rank, per time bucket) and writes the maps into the
graph's weight inputs in place. Until a block's map is ready its approximation is residual
reuse (the ``ready`` weight input, ``decision.approx_map``).
"""

from __future__ import annotations

import time

import torch

from ..config import FastCacheConfig
from ..ops.maps import ACCUM_KEYS
from ..passes.block_cache import BlockCacheResult
from ..calibration import RidgeStats


def _size(d) -> int:
    return int(d.node.hint) if isinstance(d, torch.SymInt) else int(d)


class OnlineCalibration:
    """Accumulators and refits of one compiled graph.

    Args:
        layout: the block-cache result (``layout.accums``: accumulator specs per block, stream, key;
            ``layout.weights``: the map inputs, including "<block>.ready").
        config: ``approx``, ``rank``, ``time_buckets``, ``refit_every``, ``online_min_samples``.
        device: where the accumulators live (float64; on Apple MPS, float64 is unavailable).

    Attributes:
        accum: {accumulator spec name: tensor} current statistics.
        refits: number of (block, bucket) refits done; refit_seconds: host time spent in them.
    """

    def __init__(self, layout: BlockCacheResult, config: FastCacheConfig, device: torch.device) -> None:
        self.layout = layout
        self.kind = layout.approx
        self.rank = layout.rank
        self.buckets = layout.time_buckets
        self.refit_every = config.refit_every
        self.min_samples = config.online_min_samples
        self.accum = {a.name: torch.zeros(a.shape, dtype=a.dtype, device=device) for a in layout.accums}
        self.streams: dict[str, list[int]] = {}
        for a in layout.accums:
            if a.key == "n":
                self.streams.setdefault(a.block, []).append(a.stream)
        shapes = dict(zip(layout.blocks, layout.stream_shapes))
        # token pairs one full computation adds, per (block, stream)
        # (a dynamic-shape graph: the traced sizes; only the refit cadence depends on it)
        self.tokens = {(b, s): _size(shapes[b][s][0]) * _size(shapes[b][s][1]) for b, ss in self.streams.items() for s in ss}
        self.fitted_n: dict[tuple[str, int, int], float] = {}
        self.calls = 0
        self.refits = 0
        self.refit_seconds = 0.0

    def initial_weights(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Zero maps and ready = 0 for every WeightSpec (residual reuse until the first refit)."""
        return {w.name: torch.zeros(w.shape, dtype=w.dtype, device=device) for w in self.layout.weights}

    def after_step(self, new_accums: list[torch.Tensor], weights: dict[str, torch.Tensor], clone: bool = False) -> None:
        """Take the graph's new accumulators; every ``refit_every`` calls, refit what is due."""
        for a, t in zip(self.layout.accums, new_accums):
            self.accum[a.name] = t.clone() if clone else t
        self.calls += 1
        if self.calls % self.refit_every == 0:
            self.refit(weights)

    def refit(self, weights: dict[str, torch.Tensor], force: bool = False) -> int:
        """Refit the (block, bucket) maps with >= ``refit_every`` new full computations (all, with
        ``force``) and enough samples; returns how many were refitted."""
        keys = [(b, s) for b, ss in self.streams.items() for s in ss]
        if not keys:
            return 0
        t0 = time.perf_counter()
        counts = torch.stack([self.accum[f"{b}.n.{s}"] for b, s in keys]).cpu()  # the one host read: [P, K]
        n_of = {k: counts[i] for i, k in enumerate(keys)}
        done = 0
        for block, ss in self.streams.items():
            for k in range(self.buckets):
                due = []
                for s in ss:
                    n = float(n_of[(block, s)][k])
                    need = self.min_samples if self.min_samples is not None else 2 * self._width(block, s)
                    new_full = (n - self.fitted_n.get((block, s, k), 0.0)) / self.tokens[(block, s)]
                    due.append(n >= need and n > 0 and (force or new_full >= self.refit_every))
                if not all(due):
                    continue
                for s in ss:
                    self._fit_one(block, s, k, weights)
                    self.fitted_n[(block, s, k)] = float(n_of[(block, s)][k])
                ready = weights[f"{block}.ready"]
                if ready.dim() == 0:
                    ready.fill_(1.0)
                else:
                    ready[k] = 1.0
                done += 1
        self.refits += done
        self.refit_seconds += time.perf_counter() - t0
        return done

    def stats(self, block: str, stream: int = 0, bucket: int = 0) -> RidgeStats:
        """The accumulated statistics of one (block, stream, bucket) as a ``RidgeStats``."""
        g = lambda key: self.accum[f"{block}.{key}.{stream}"][bucket]
        return RidgeStats.from_tensors(*(g(key) for key in ACCUM_KEYS))

    def _width(self, block: str, stream: int) -> int:
        return int(self.accum[f"{block}.sx.{stream}"].shape[-1])

    def _fit_one(self, block: str, s: int, k: int, weights: dict[str, torch.Tensor]) -> None:
        fit = self.stats(block, s, k).solve(identity=self.kind == "linear", rank=self.rank)
        vals = {"weight": fit.weight, "bias": fit.bias} if self.rank is None else {"u": fit.u, "v": fit.v, "bias": fit.bias}
        for key, val in vals.items():
            w = weights[f"{block}.{key}.{s}"]
            (w if self.buckets == 1 else w[k]).copy_(val.to(w.device, w.dtype))
