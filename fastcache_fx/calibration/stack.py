"""The block-stack map of token selection (``static_approx`` "linear" / "cached_linear"):
``calibrate_stack``, ``merge_stack``, ``load_stack_map``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..ops.decision import TrajectoryTracker
from ..runtime.context import current_context
from .collect import _binder, _hook_targets, _run_hooked, _timestep_value, model_info
from .file import FORMAT, FORMAT_VERSION, Calibration, load, save
from .ridge import RidgeStats


STACK_KINDS = {"stack_linear": "linear", "stack_cached_linear": "cached_linear"}
#: tensor names of the stack map in a calibration file
STACK_WEIGHT, STACK_BIAS = "stack.weight.0", "stack.bias.0"


def _image_input(named: dict) -> torch.Tensor | None:
    """The image stream entering a block: ``hidden_states``, else the 3-D input with most tokens."""
    x = named.get("hidden_states")
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return x
    ins = [v for v in named.values() if isinstance(v, torch.Tensor) and v.dim() == 3]
    return max(ins, key=lambda v: v.shape[1]) if ins else None


def collect_stack_stats(model, run_fn: Callable, kind: str = "stack_linear",
                        stats_device: torch.device | str | None = None) -> tuple[RidgeStats, dict]:
    """Run ``run_fn(model)`` with hooks on the first and last block and accumulate the ridge
    statistics of the whole block stack's map on the image stream, per image token.

    ``stack_linear``: pairs (x, y), x [D] a token of the image stream entering the first block,
    y [D] the same token leaving the last block (FastCache sec. 3.1: static tokens get
    W_static x + b_static). ``stack_cached_linear``: consecutive calls t-1, t of the model in one
    trajectory and context give dX = x_t - x_{t-1}, dY = y_t - y_{t-1} (the issue's
    Y_t ~ Y_{t-1} + W_s (X_t - X_{t-1})); trajectories and contexts as in ``collect_stats``.

    Returns:
        (RidgeStats over D -> D, {"first", "last": block names, "tokens": N, "width": D,
        "info": model_info}).

    Raises:
        ValueError: unknown ``kind``; a model without block lists; no pair recorded (no block
            called; for stack_cached_linear: no model call following another in a trajectory);
            the last block's image output differs in shape from the first block's input.
    """
    if kind not in STACK_KINDS:
        raise ValueError(f"kind: expected one of {tuple(STACK_KINDS)}, got {kind!r}")
    model, target, blocks = _hook_targets(model)
    names = list(blocks)
    first, last_name = names[0], names[-1]
    bind_first, bind_model = _binder(blocks[first]), _binder(target)
    holder: dict = {"stats": None, "shape": None}
    pending: dict[str, torch.Tensor] = {}  # context -> image input of the first block this call
    prev: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # context -> (x, y) of the previous call
    clock = TrajectoryTracker()  # per context: the runtime's trajectory rule

    def model_pre_hook(module, args, kwargs):
        t = _timestep_value(bind_model(args, kwargs))
        ctx = current_context()
        if t is not None:
            if clock.new(ctx, t):  # a new trajectory: pairs never span two
                prev.pop(ctx, None)

    def first_pre_hook(module, args, kwargs):
        x = _image_input(bind_first(args, kwargs))
        if x is not None:
            pending[current_context()] = x.detach().clone()

    def last_hook(module, args, kwargs, output):
        ctx = current_context()
        x = pending.pop(ctx, None)
        if x is None:
            return
        outs = list(output) if isinstance(output, (tuple, list)) else [output]
        ys = [o for o in outs if isinstance(o, torch.Tensor) and o.shape == x.shape]
        if not ys:
            raise ValueError(f"calibration: {last_name} has no output of the image stream's shape {list(x.shape)}")
        y = ys[-1].detach()  # diffusers joint blocks return (encoder_hidden_states, hidden_states)
        if holder["stats"] is None:
            holder["stats"] = RidgeStats(x.shape[-1], y.shape[-1], stats_device)
            holder["shape"] = (int(x.shape[1]), int(x.shape[-1]))
        if kind == "stack_linear":
            holder["stats"].add(x, y)
            return
        p = prev.get(ctx)
        if p is not None and p[0].shape == x.shape:
            holder["stats"].add(x - p[0], y - p[1])
        prev[ctx] = (x, y.clone())

    handles = [target.register_forward_pre_hook(model_pre_hook, with_kwargs=True),
               blocks[first].register_forward_pre_hook(first_pre_hook, with_kwargs=True),
               blocks[last_name].register_forward_hook(last_hook, with_kwargs=True)]
    _run_hooked(model, run_fn, handles)
    st = holder["stats"]
    if st is None or st.n == 0:
        raise ValueError("calibration: run_fn produced no (input, output) pair of the block stack"
                         + (" (stack_cached_linear needs two model calls in one trajectory)"
                            if kind == "stack_cached_linear" else ""))
    n_tok, width = holder["shape"]
    return st, {"first": first, "last": last_name, "tokens": n_tok, "width": width, "info": model_info(target)}


def fit_stack(stats: RidgeStats, kind: str, where: dict, ridge: float | None = None) -> Calibration:
    """Fit the stack map of ``collect_stack_stats`` into a Calibration of kind ``kind``.

    Both kinds are fitted with the identity-plus-residual prior (``RidgeStats.solve(identity=
    True)``): ``stack_linear`` fits y = x + C x + b (an under-determined fit degrades to
    x + the mean residual of the stack); ``stack_cached_linear`` fits dY = dX + C dX + b, the
    ``residual_linear`` rule of the block maps (it degrades to Y_ref + (X - X_ref) + mean: the
    cached output moved with the input, the stack's residual reuse). The stored weight is the
    full map W = I + C [D, D] and the bias b [D]: "stack.weight.0", "stack.bias.0".

    Metadata: as ``fit_calibration`` (format, version, model_class, config_hash, kind, width,
    rank null, buckets 1, prior, samples/fit_error/ridge keyed by "stack", ridge_rule) plus
    ``stack`` {"static_approx", "first", "last", "tokens", "width", "samples", "fit_error",
    "ridge"} (what ``load_stack_map`` reads) and an empty ``streams`` (no block maps).
    """
    if kind not in STACK_KINDS:
        raise ValueError(f"kind: expected one of {tuple(STACK_KINDS)}, got {kind!r}")
    f = stats.solve(ridge, identity=True)
    stack = {"static_approx": STACK_KINDS[kind], "first": where["first"], "last": where["last"],
             "tokens": where["tokens"], "width": where["width"], "samples": int(stats.n),
             "fit_error": float(f.rel_error), "ridge": float(f.ridge)}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **where["info"], "kind": kind, "width": where["width"],
            "rank": None, "buckets": 1, "timestep_max": 1000.0, "prior": "identity_plus_residual",
            "streams": {}, "samples": {"stack": [int(stats.n)]}, "fit_error": {"stack": [float(f.rel_error)]},
            "ridge": {"stack": [float(f.ridge)]}, "ridge_rule": "gcv" if ridge is None else "fixed", "stack": stack}
    return Calibration({STACK_WEIGHT: f.weight, STACK_BIAS: f.bias}, meta)


def calibrate_stack(model, run_fn: Callable, out: str | Path | None = None, kind: str = "stack_linear",
                    ridge: float | None = None, stats_device: torch.device | str | None = None) -> Calibration:
    """Fit the block-stack map of token selection (``static_approx`` "linear" with
    ``kind="stack_linear"``, "cached_linear" with ``kind="stack_cached_linear"``) on the
    uncompiled ``model`` while ``run_fn(model)`` runs it: ``collect_stack_stats`` + ``fit_stack``
    (written to ``out`` when given). Use the file as ``calibration=path``; ``merge_stack`` adds
    the map to a file of block maps so one file serves ``approx`` and ``static_approx``.

    Raises:
        ValueError: see ``collect_stack_stats``.
    """
    st, where = collect_stack_stats(model, run_fn, kind=kind, stats_device=stats_device)
    cal = fit_stack(st, kind, where, ridge=ridge)
    if out is not None:
        save(cal, out)
    return cal


def merge_stack(block_cal: Calibration, stack_cal: Calibration) -> Calibration:
    """``block_cal`` (block maps) with the stack map of ``stack_cal`` added (its tensors and its
    ``stack`` metadata); the block maps' kind and metadata are kept.

    Raises:
        ValueError: ``stack_cal`` holds no stack map, or the two are for different models.
    """
    if "stack" not in stack_cal.metadata or STACK_WEIGHT not in stack_cal.tensors:
        raise ValueError("merge_stack: the second calibration holds no stack map")
    for k in ("model_class", "config_hash"):
        a, b = block_cal.metadata.get(k), stack_cal.metadata.get(k)
        if a and b and a != b:
            raise ValueError(f"merge_stack: the calibrations are for different models ({k} {a!r} != {b!r})")
    tensors = dict(block_cal.tensors)
    tensors[STACK_WEIGHT], tensors[STACK_BIAS] = stack_cal.tensors[STACK_WEIGHT], stack_cal.tensors[STACK_BIAS]
    return Calibration(tensors, {**block_cal.metadata, "stack": stack_cal.metadata["stack"]})


def load_stack_map(path: str | Path, static_approx: str, width: int,
                   model_info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The stack map (W [D, D], b [D] float32) for ``static_approx`` from a calibration file,
    or None when the file holds no stack map (the caller falls back to "cached").

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a calibration file; the stack map was fitted for the other
            static_approx, another model, or another width D; its tensors are missing/misshapen.
    """
    cal = load(path)
    stack = cal.metadata.get("stack")
    if not stack:
        return None
    if stack.get("static_approx") != static_approx:
        raise ValueError(f"calibration: the stack map in {path} was fitted for static_approx="
                         f"{stack.get('static_approx')!r}, the config asks for static_approx={static_approx!r}")
    for k in ("model_class", "config_hash"):
        meta = cal.metadata
        if model_info and model_info.get(k) and meta.get(k) and model_info[k] != meta[k]:
            raise ValueError(f"calibration: {path} is for another model: {k}={meta[k]!r} in file, "
                             f"the model has {k}={model_info[k]!r}")
    if int(stack.get("width", -1)) != width:
        raise ValueError(f"calibration: the stack map in {path} has width {stack.get('width')}, the image stream has {width}")
    w, b = cal.tensors.get(STACK_WEIGHT), cal.tensors.get(STACK_BIAS)
    if w is None or b is None or tuple(w.shape) != (width, width) or tuple(b.shape) != (width,):
        raise ValueError(f"calibration: {path}: tensors {STACK_WEIGHT} / {STACK_BIAS} missing or not "
                         f"[{width}, {width}] / [{width}]")
    return w.float().contiguous(), b.float().contiguous()
