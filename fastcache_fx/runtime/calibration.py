"""Offline calibration of the linear block maps by ridge regression (FastCache eq. 6).

``calibrate(model, run_fn)`` hooks every block of the *uncompiled* model, lets ``run_fn`` run a
few trajectories, and accumulates per block and stream the sufficient statistics of
(input token x [D], output token y [D]) pairs in float64: n, sum x, sum y, X^T X, X^T Y (memory
O(D^2), tokens are never stored). The fit is closed-form ridge regression on centred data:
W^T = (Xc^T Xc + lambda I)^-1 Xc^T Yc, b = mean_y - W mean_x, with lambda = 1e-3 * tr(Xc^T Xc) / D
(relative to the data scale). For ``residual_linear`` the pairs are consecutive calls of a block:
dX = x_t - x_{t-1}, dY = y_t - y_{t-1}, fit dY = W dX + b.

Streams are ordered canonically by token count N (largest first: the image stream before the
text stream of joint blocks) and matched to graph regions by (N, D) when loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("linear", "residual_linear")
RIDGE_RELATIVE = 1e-3


class RidgeStats:
    """Sufficient statistics of y = W x + b for tokens of width D (float64, O(D^2))."""

    def __init__(self, d_in: int, d_out: int) -> None:
        self.n = 0
        self.sx = torch.zeros(d_in, dtype=torch.float64)
        self.sy = torch.zeros(d_out, dtype=torch.float64)
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.xty = torch.zeros(d_in, d_out, dtype=torch.float64)
        self.yty = 0.0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate token pairs x [..., D_in], y [..., D_out]."""
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        y = y.detach().reshape(-1, y.shape[-1]).double().cpu()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += float((y * y).sum())

    def fit(self, ridge: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Closed-form ridge fit on centred data.

        Returns:
            (W [D_out, D_in] float32, b [D_out] float32, relative training error
            ||Y - XW^T - b||_F / ||Y - mean_y||_F).

        Raises:
            ValueError: no samples were accumulated.
        """
        if self.n == 0:
            raise ValueError("calibration: no samples accumulated")
        mx, my = self.sx / self.n, self.sy / self.n
        cxx = self.xtx - self.n * torch.outer(mx, mx)
        cxy = self.xty - self.n * torch.outer(mx, my)
        d = cxx.shape[0]
        lam = ridge if ridge is not None else RIDGE_RELATIVE * float(torch.trace(cxx)) / d + 1e-12
        wt = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=torch.float64), cxy)  # [D_in, D_out]
        b = my - mx @ wt
        # residual sum of squares from the statistics: tr(Cyy) - 2 tr(W Cxy) + tr(W Cxx W^T)
        cyy_tr = self.yty - self.n * float(my @ my)
        rss = cyy_tr - 2 * float((wt * cxy).sum()) + float((wt * (cxx @ wt)).sum())
        rel = (max(rss, 0.0) / cyy_tr) ** 0.5 if cyy_tr > 0 else 0.0
        return wt.T.float().contiguous(), b.float(), rel


@dataclass
class Calibration:
    """Fitted maps ("<block>.weight.<s>" [D, D], "<block>.bias.<s>" [D]) and their metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)


def model_info(model) -> dict:
    """Class name and a hash of the diffusers config (what a calibration file is checked against)."""
    cfg = getattr(model, "config", None)
    h = hashlib.sha256(json.dumps(dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16] if cfg else ""
    return {"model_class": type(model).__name__, "config_hash": h}


def _block_modules(model) -> dict[str, torch.nn.Module]:
    out = {}
    for list_name in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(model, list_name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            for i, b in enumerate(blocks):
                out[f"{list_name}.{i}"] = b
    return out


def _pairs(args, kwargs, output) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) stream pairs of one block call, ordered by token count (largest first)."""
    outs = output if isinstance(output, (tuple, list)) else (output,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.dim() == 3]
    ins = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() == 3]
    prefer = [kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")]
    pairs, used = [], set()
    for o in sorted(outs, key=lambda t: -t.shape[1]):
        cands = [x for x in prefer if isinstance(x, torch.Tensor) and x.shape == o.shape and id(x) not in used]
        cands += [x for x in ins if x.shape == o.shape and id(x) not in used]
        if cands:
            used.add(id(cands[0]))
            pairs.append((cands[0], o))
    return pairs


def calibrate(model, run_fn, out: str | Path | None = None, kind: str = "linear", ridge: float | None = None) -> Calibration:
    """Fit per-block linear maps on the uncompiled ``model`` while ``run_fn(model)`` runs it.

    Args:
        model: a diffusers transformer (blocks in ``transformer_blocks`` / ``single_transformer_blocks``).
        run_fn: called once with ``model``; runs a few sampling trajectories.
        out: where to save the safetensors file (optional).
        kind: "linear" (y = W x + b) or "residual_linear" (dY = W dX + b between consecutive calls).

    Raises:
        ValueError: unknown ``kind``, or no block was called.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    blocks = _block_modules(model)
    if not blocks:
        raise ValueError(f"calibration: {type(model).__name__} has no transformer_blocks / single_transformer_blocks")
    stats: dict[tuple[str, int], RidgeStats] = {}
    last: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    shapes: dict[tuple[str, int], tuple] = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            for s, (x, y) in enumerate(_pairs(args, kwargs, output)):
                key = (name, s)
                shapes[key] = tuple(y.shape[1:])
                st = stats.setdefault(key, RidgeStats(x.shape[-1], y.shape[-1]))
                if kind == "linear":
                    st.add(x, y)
                else:
                    prev = last.get(key)
                    if prev is not None and prev[0].shape == x.shape:
                        st.add(x - prev[0], y - prev[1])
                    last[key] = (x.detach().clone(), y.detach().clone())
        return fn

    handles = [b.register_forward_hook(hook(n), with_kwargs=True) for n, b in blocks.items()]
    try:
        with torch.no_grad():
            run_fn(model)
    finally:
        for h in handles:
            h.remove()
    if not stats:
        raise ValueError("calibration: run_fn did not call any block")
    tensors, errors, samples, widths = {}, {}, {}, {}
    for (name, s), st in stats.items():
        w, b, err = st.fit(ridge)
        tensors[f"{name}.weight.{s}"], tensors[f"{name}.bias.{s}"] = w, b
        errors[f"{name}.{s}"], samples[f"{name}.{s}"] = err, st.n
        widths[f"{name}.{s}"] = list(shapes[(name, s)])
    meta = {**model_info(model), "kind": kind, "stream_shapes": widths, "samples": samples, "fit_error": errors,
            "ridge": "relative 1e-3 * tr(Cxx)/D" if ridge is None else ridge}
    cal = Calibration(tensors, meta)
    if out is not None:
        save(cal, out)
    return cal


def save(cal: Calibration, path: str | Path) -> None:
    """Write tensors as safetensors with the metadata as JSON under the key "fastcache"."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in cal.tensors.items()}, str(path), metadata={"fastcache": json.dumps(cal.metadata)})


def load(path: str | Path) -> Calibration:
    """Read a calibration file. Raises ValueError if it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get("fastcache")
        if meta is None:
            raise ValueError(f"calibration: {path} has no fastcache metadata")
        return Calibration({k: f.get_tensor(k) for k in f.keys()}, json.loads(meta))


def load_calibration(path, regions, kind: str, model_info_: dict | None = None) -> dict[str, torch.Tensor]:
    """Weights for the graph pass: "<region>.weight.<s>" [D, D] and "<region>.bias.<s>" [D] with s
    in the region's stream order (matched to the file's canonical order by (N, D)).

    Raises:
        ValueError: wrong kind, model class / config hash, missing block, or width mismatch (named).
    """
    cal = load(path)
    meta = cal.metadata
    if meta.get("kind") != kind:
        raise ValueError(f"calibration: file was fitted for approx={meta.get('kind')!r}, asked for {kind!r}")
    if model_info_:
        for k in ("model_class", "config_hash"):
            if model_info_.get(k) and meta.get(k) and model_info_[k] != meta[k]:
                raise ValueError(f"calibration: file is for {k}={meta[k]!r}, model has {model_info_[k]!r}")
    shapes = meta.get("stream_shapes", {})
    out = {}
    for r in regions:
        file_streams = {int(k.rsplit(".", 1)[1]): tuple(v) for k, v in shapes.items() if k.rsplit(".", 1)[0] == r.name}
        if not file_streams:
            raise ValueError(f"calibration: no map for block {r.name}")
        for s, shape in enumerate(r.stream_shapes):
            n, d = shape[1], shape[-1]
            match = [fs for fs, (fn, fd) in file_streams.items() if fn == n and fd == d]
            if not match:
                widths = sorted(fd for _, fd in file_streams.values())
                raise ValueError(f"calibration: block {r.name} stream {s} has width {d} and {n} tokens in the model; "
                                 f"the file has widths {widths}")
            fs = match[0]
            out[f"{r.name}.weight.{s}"] = cal.tensors[f"{r.name}.weight.{fs}"].float()
            out[f"{r.name}.bias.{s}"] = cal.tensors[f"{r.name}.bias.{fs}"].float()
    return out
