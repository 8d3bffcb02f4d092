"""Fitting the block maps from collected statistics (``fit_calibration``) and the one-call
``calibrate``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from .collect import CalibrationStats, collect_stats
from .file import FORMAT, FORMAT_VERSION, Calibration, save
from .ridge import RidgeStats
from .stack import STACK_KINDS, calibrate_stack


def fit_calibration(cs: CalibrationStats, rank: int | None = None, time_buckets: int | None = None,
                    ridge: float | None = None) -> Calibration:
    """Fit the maps of ``cs`` (one ridge solve per block, stream and bucket).

    ``linear`` fits the residual y - x (W = I + C, shrunk toward residual reuse: see
    ``RidgeStats.solve(identity=True)``); ``residual_linear`` fits dR = C dX + b (prior C = 0:
    again residual reuse). ``time_buckets`` may be a divisor of ``cs.time_buckets`` (buckets are
    pooled: K = 1 from statistics collected with K = 4); None keeps the collected K. A bucket
    without samples gets the fit of all buckets pooled (recorded as 0 samples).

    Raises:
        ValueError: ``time_buckets`` does not divide the collected K; a bad ``rank``.
    """
    kc = cs.time_buckets
    k_out = kc if time_buckets is None else time_buckets
    if isinstance(k_out, bool) or not isinstance(k_out, int) or k_out < 1 or kc % k_out:
        raise ValueError(f"time_buckets: expected a divisor of the collected {kc}, got {time_buckets!r}")
    identity = cs.kind == "linear"
    tensors: dict[str, torch.Tensor] = {}
    streams, samples, bsamples, errors, berrors, ridges = {}, {}, {}, {}, {}, {}
    for name in cs.blocks:
        s = 0
        while (name, s) in cs.shapes:
            n_tok, width = cs.shapes[(name, s)]
            per = []  # merged stats per output bucket
            for k in range(k_out):
                st = None
                for kk in range(k * (kc // k_out), (k + 1) * (kc // k_out)):
                    src = cs.stats.get((name, s, kk))
                    if src is not None:
                        st = (st or RidgeStats(src.d_in, src.d_out)).merge(src)
                per.append(st)
            pooled = None
            for st in per:
                if st is not None:
                    pooled = (pooled or RidgeStats(st.d_in, st.d_out)).merge(st)
            if pooled is None:
                break
            fits = [(st if st is not None and st.n > 0 else pooled).solve(ridge, identity=identity, rank=rank)
                    for st in per]
            keys = ("u", "v", "bias") if rank is not None else ("weight", "bias")
            for key in keys:
                ts = [getattr(f, key) for f in fits]
                tensors[f"{name}.{key}.{s}"] = ts[0] if k_out == 1 else torch.stack(ts)
            streams.setdefault(name, []).append({"tokens": int(n_tok), "width": int(width)})
            ns = [0 if st is None else int(st.n) for st in per]
            samples.setdefault(name, []).append(sum(ns))
            bsamples.setdefault(name, []).append(ns)
            # pooled relative error: sqrt(sum_k err_k^2 var_k / sum_k var_k), weighted by samples
            w = [max(n, 0) for n in ns]
            errors.setdefault(name, []).append(float(math.sqrt(sum(wi * f.rel_error ** 2 for wi, f in zip(w, fits))
                                                               / max(sum(w), 1))))
            berrors.setdefault(name, []).append([float(f.rel_error) for f in fits])
            ridges.setdefault(name, []).append([float(f.ridge) for f in fits] if k_out > 1 else float(fits[0].ridge))
            s += 1
    first = next(iter(streams.values()))[0]
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **cs.info, "kind": cs.kind, "width": first["width"],
            "rank": rank, "buckets": k_out, "timestep_max": cs.timestep_max, "prior": "identity_plus_residual",
            "streams": streams, "samples": samples, "bucket_samples": bsamples, "fit_error": errors,
            "bucket_fit_error": berrors, "ridge": ridges, "ridge_rule": "gcv" if ridge is None else "fixed"}
    return Calibration(tensors, meta)


def calibrate(model, run_fn: Callable, out: str | Path | None = None, kind: str = "linear",
              ridge: float | None = None, stats_device: torch.device | str | None = None,
              rank: int | None = None, time_buckets: int = 1, timestep_max: float = 1000.0) -> Calibration:
    """Fit per-block linear maps on the uncompiled ``model`` while ``run_fn(model)`` runs it.

    Forward hooks (``with_kwargs=True``) on every block of ``transformer_blocks`` /
    ``single_transformer_blocks`` pair each output stream with its input (``stream_pairs``) and
    accumulate ``RidgeStats`` per (block, canonical stream, time bucket); nothing else of the
    model changes and the hooks are removed afterwards. Runs under ``torch.no_grad()``.
    ``collect_stats`` + ``fit_calibration``.

    Args:
        model: a diffusers transformer, a pipeline with ``.transformer`` (``run_fn`` then gets
            the pipeline), or a ``torch.compile``d module (its original module is hooked and
            ``run_fn`` gets that, uncompiled).
        run_fn: called once; runs a few sampling trajectories.
        out: where to save the safetensors file (optional).
        kind: "linear" (y = W x + b with W = I + C) or "residual_linear" (dR = C dX + b, see
            the module doc); "stack_linear" / "stack_cached_linear" fit the block-stack map of
            token selection instead (``calibrate_stack``; no rank, one time bucket).
        ridge: None chooses lambda per stream by GCV; a float is an absolute lambda.
        stats_device: where statistics accumulate (default: the activations' device). Each
            stream needs 8 (D^2 + D_in D_out) bytes per bucket: ~150 MB at D = 3072.
        rank: None (full W) or r: W = I + U V^T (``linear``) / C = U V^T (``residual_linear``).
        time_buckets: K maps per block, bucket k covering t / timestep_max in [k/K, (k+1)/K).
        timestep_max: the timestep value mapped to 1 (``FastCacheConfig.timestep_max``).

    Returns:
        The Calibration (also written to ``out`` when given).

    Raises:
        ValueError: unknown ``kind``, bad ``rank`` / ``time_buckets``, a model without block
            lists, or ``run_fn`` produced no pair (no block was called; for residual_linear: no
            block called twice in a trajectory).
    """
    if kind in STACK_KINDS:
        if rank is not None or time_buckets != 1:
            raise ValueError(f"kind={kind!r}: the block-stack map has no rank / time buckets "
                             f"(got rank={rank!r}, time_buckets={time_buckets!r})")
        return calibrate_stack(model, run_fn, out=out, kind=kind, ridge=ridge, stats_device=stats_device)
    cs = collect_stats(model, run_fn, kind=kind, time_buckets=time_buckets, timestep_max=timestep_max,
                       stats_device=stats_device)
    cal = fit_calibration(cs, rank=rank, ridge=ridge)
    if out is not None:
        save(cal, out)
    return cal
