"""Collecting the ridge statistics of every block while a run function samples the uncompiled model
(forward hooks; tokens are never stored): ``collect_stats``."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.decision import TrajectoryTracker
from ..runtime.context import current_context
from .file import KINDS
from .ridge import RidgeStats


def model_info(model) -> dict:
    """{"model_class", "config_hash"} of a model: what a calibration file is checked against."""
    cfg = getattr(model, "config", None)
    h = ""
    if cfg is not None:
        h = hashlib.sha256(json.dumps(dict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    return {"model_class": type(model).__name__, "config_hash": h}


def block_modules(model) -> dict[str, torch.nn.Module]:
    """{"transformer_blocks.<i>" / "single_transformer_blocks.<i>": module} of a transformer
    (the names ``BlockRegion.name`` gives the same blocks in a traced graph)."""
    out = {}
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, list_name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for i, b in enumerate(blocks):
                out[f"{list_name}.{i}"] = b
    return out


def _binder(module: torch.nn.Module) -> Callable:
    """(args, kwargs) -> {parameter name: value} for ``module.forward`` (positional names too)."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        sig = None

    def bind(args, kwargs) -> dict:
        if sig is not None:
            try:
                named = dict(sig.bind_partial(*args, **kwargs).arguments)
                for p in sig.parameters.values():  # flatten **kwargs
                    if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(named.get(p.name), dict):
                        named.update(named.pop(p.name))
                return named
            except TypeError:
                pass
        return {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}

    return bind


def stream_pairs(named_inputs: dict, output) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) stream pairs of one block call, in canonical order.

    Outputs are the 3-D tensors [B, N, D] of ``output`` (a tensor or a tuple; None entries such
    as the last SD3 block's encoder stream are skipped). Each is paired with an unused input of
    the same shape, preferring the diffusers name for its position: ``hidden_states`` for a
    single tensor or the last element of a pair, ``encoder_hidden_states`` for the first element
    of a pair (SD3/Flux blocks return (encoder_hidden_states, hidden_states)). Pairs are sorted
    by N descending; on a tie the ``hidden_states`` pair comes first.
    """
    outs = list(output) if isinstance(output, (tuple, list)) else [output]
    ins = [(k, v) for k, v in named_inputs.items() if isinstance(v, torch.Tensor) and v.dim() == 3]
    pairs, used = [], set()
    for p, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.dim() != 3:
            continue
        want = "hidden_states" if len(outs) == 1 or p == len(outs) - 1 else \
            "encoder_hidden_states" if (len(outs) == 2 and p == 0) else None
        cands = [(k, v) for k, v in ins if v.shape == o.shape and k not in used]
        cands.sort(key=lambda kv: kv[0] != want)  # stable: the preferred name first
        if cands:
            used.add(cands[0][0])
            pairs.append((cands[0][0], cands[0][1], o))
    pairs.sort(key=lambda t: (-t[2].shape[1], t[0] != "hidden_states"))
    return [(x, y) for _, x, y in pairs]


def _timestep_value(named: dict) -> float | None:
    t = named.get("timestep")
    if isinstance(t, torch.Tensor) and t.numel() > 0:
        return float(t.reshape(-1)[0])
    if isinstance(t, (int, float)):
        return float(t)
    return None


def time_bucket(t: float, buckets: int, timestep_max: float) -> int:
    """Bucket k in 0..K-1 of a timestep: floor(K t / timestep_max), clamped (t / timestep_max is
    the normalised timestep; AdaLN makes a block's function depend on it)."""
    return min(max(int(math.floor(buckets * float(t) / timestep_max)), 0), buckets - 1)


@dataclass
class CalibrationStats:
    """Accumulated statistics of one calibration run, before fitting.

    stats: {(block, canonical stream, bucket): RidgeStats}; shapes: {(block, stream): (N, D)};
    blocks: block names in model order; kind, time_buckets, timestep_max as collected;
    info: ``model_info`` of the model.
    """

    stats: dict
    shapes: dict
    blocks: list
    kind: str
    time_buckets: int
    timestep_max: float
    info: dict


def _hook_targets(model) -> tuple:
    """(what ``run_fn`` receives, the transformer to hook, its blocks) for a transformer, a
    ``torch.compile``d one (its original module is run and hooked) or a pipeline.

    Raises:
        ValueError: the transformer has no block lists.
    """
    target = model.transformer if not isinstance(model, torch.nn.Module) and hasattr(model, "transformer") else model
    target = getattr(target, "_orig_mod", target)
    if target is not model and isinstance(model, torch.nn.Module):
        model = target  # a compiled module: run the original
    blocks = block_modules(target)
    if not blocks:
        raise ValueError(f"calibration: {type(target).__name__} has no transformer_blocks / single_transformer_blocks")
    return model, target, blocks


def _run_hooked(model, run_fn: Callable, handles: list) -> None:
    """``run_fn(model)`` without autograd; the hooks are removed afterwards, whatever happens."""
    try:
        with torch.no_grad():
            run_fn(model)
    finally:
        for h in handles:
            h.remove()


def collect_stats(model, run_fn: Callable, kind: str = "linear", time_buckets: int = 1,
                  timestep_max: float = 1000.0, stats_device: torch.device | str | None = None) -> CalibrationStats:
    """Run ``run_fn(model)`` with forward hooks on every block and accumulate ``RidgeStats``
    per (block, canonical stream, time bucket). See ``calibrate`` for the arguments.

    Raises:
        ValueError: unknown ``kind``, ``time_buckets`` < 1, ``time_buckets`` > 1 on a model
            called without a ``timestep``, a model without block lists, or no pair recorded.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if isinstance(time_buckets, bool) or not isinstance(time_buckets, int) or time_buckets < 1:
        raise ValueError(f"time_buckets: expected an integer >= 1, got {time_buckets!r}")
    if not timestep_max > 0:
        raise ValueError(f"timestep_max: expected > 0, got {timestep_max!r}")
    model, target, blocks = _hook_targets(model)
    stats: dict[tuple[str, int, int], RidgeStats] = {}
    shapes: dict[tuple[str, int], tuple[int, int]] = {}
    last: dict[tuple[str, str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (context, block, s) -> (x, y)
    clock = TrajectoryTracker()  # per context: the runtime's trajectory rule
    now = {"bucket": 0}

    def model_pre_hook(module, args, kwargs):
        t = _timestep_value(bind_model(args, kwargs))
        ctx = current_context()
        if t is None:
            if time_buckets > 1:
                raise ValueError("time_buckets: the model was called without a timestep")
            return
        now["bucket"] = time_bucket(t, time_buckets, timestep_max)
        if clock.new(ctx, t):  # a new trajectory: pairs never span two
            for k in [k for k in last if k[0] == ctx]:
                del last[k]

    def hook(name, bind):
        def fn(module, args, kwargs, output):
            for s, (x, y) in enumerate(stream_pairs(bind(args, kwargs), output)):
                shapes.setdefault((name, s), (x.shape[1], x.shape[-1]))
                key = (name, s, now["bucket"])
                if kind == "linear":
                    stats.setdefault(key, RidgeStats(x.shape[-1], y.shape[-1], stats_device)).add(x, y)
                    continue
                lk = (current_context(), name, s)
                prev = last.get(lk)
                if prev is not None and prev[0].shape == x.shape:
                    dx = x - prev[0]
                    stats.setdefault(key, RidgeStats(x.shape[-1], y.shape[-1], stats_device)).add(dx, (y - prev[1]) - dx)
                last[lk] = (x.detach().clone(), y.detach().clone())
        return fn

    bind_model = _binder(target)
    handles = [b.register_forward_hook(hook(n, _binder(b)), with_kwargs=True) for n, b in blocks.items()]
    handles.append(target.register_forward_pre_hook(model_pre_hook, with_kwargs=True))
    _run_hooked(model, run_fn, handles)
    if not stats:
        raise ValueError("calibration: run_fn produced no (input, output) pair"
                         + (" (residual_linear needs a block called at least twice in one trajectory)"
                            if kind == "residual_linear" else " (no block was called)"))
    return CalibrationStats(stats, shapes, list(blocks), kind, time_buckets, float(timestep_max), model_info(target))
