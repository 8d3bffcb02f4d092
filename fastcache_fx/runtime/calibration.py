"""Offline calibration of the linear block maps by ridge regression (FastCache eq. 6).

``calibrate(model, run_fn)`` hooks every block of the *uncompiled* model, lets ``run_fn`` run a
few trajectories, and accumulates per block and stream the sufficient statistics of
(input token x [D], output token y [D]) pairs in float64: n, sum x, sum y, X^T X, X^T Y
(memory O(D^2) per stream; tokens are never stored). The fit is closed-form ridge regression on
centred data (Hastie, Tibshirani, Friedman, ESL sec. 3.4.1):

    W^T = (Cxx + lambda I)^-1 Cxy,   b = mean_y - W mean_x,
    Cxx = X^T X - n mean_x mean_x^T,  Cxy = X^T Y - n mean_x mean_y^T,

with lambda chosen by generalized cross-validation (Golub, Heath, Wahba 1979) on a log grid,
from the eigendecomposition Cxx = V diag(e) V^T alone (see ``RidgeStats.solve``).

What is fitted (``kind``), matching ``runtime.decision``:
- ``linear``: y = W x + b, the block output from its input (``approx_linear``: H_l ~ W H + b,
  FastCache eq. 6), fitted as W = I + C on the residual r = y - x: the ridge penalty shrinks C
  toward 0, so with too few samples (n < D) the map degrades to H + mean residual (residual
  reuse) instead of to garbage.
- ``residual_linear``: on consecutive calls t-1, t of a block in one trajectory and context
  (consecutive *full* computations, as the runtime's anchor is the last full computation),
  dX = x_t - x_{t-1}, dY = y_t - y_{t-1}; the issue's dY = W' dX is fitted as W' = I + C with
  dR = dY - dX = C dX + b, because ``approx_residual_linear`` computes
  H + R_anchor + C (H - H_anchor) + b = Y_anchor + dX + C dX + b. Prior C = 0: residual reuse.
  A new trajectory starts when the model's ``timestep`` stops decreasing (the runtime's rule);
  calls under different ``fastcache_fx.cache_context`` names are not paired.
- ``rank=r``: C = U V^T (reduced-rank regression, ``RidgeStats.solve``), applied as
  h + (h V) U^T + b in O(N D r).
- ``time_buckets=K``: one map per bucket k = floor(K t / timestep_max) of the model's timestep.
- ``stack_linear`` / ``stack_cached_linear`` (``calibrate_stack``): one map of the whole block
  stack on the image stream, for token selection's ``static_approx="linear"`` (y = W x + b,
  x entering the first block, y leaving the last) and ``"cached_linear"`` (dY = W dX + b over
  consecutive model calls of one trajectory and context); both with the identity-plus-residual
  prior. Stored as "stack.weight.0" [D, D] (the full W) and "stack.bias.0" [D] with a ``stack``
  metadata entry, in a file of that ``kind`` or added to a file of block maps (``merge_stack``),
  so one file can serve ``approx`` and ``static_approx``; ``load_stack_map`` reads it.

Streams: a block's output streams are ordered canonically by token count N, largest first (the
image stream is stream 0 when N_img > N_txt; on a tie ``hidden_states`` comes first). The graph
pass orders streams in graph order instead; ``load_calibration`` maps one onto the other by
(N, D), then by rank of N (another resolution), checking the width D.

File format: safetensors, float32 tensors "<block>.weight.<s>" [D_out, D_in] (out x in, the
``torch.nn.functional.linear`` convention) and "<block>.bias.<s>" [D_out], or with a rank
"<block>.u.<s>" [D_out, r], "<block>.v.<s>" [D_in, r] and the bias; with K > 1 time buckets
every tensor has a leading [K]. The safetensors metadata holds JSON strings (see ``Calibration``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .context import current_context

KINDS = ("linear", "residual_linear")
FORMAT = "fastcache_fx.calibration"
FORMAT_VERSION = 2
#: fallback ridge strength relative to the data scale: lambda = RIDGE_RELATIVE * tr(Cxx) / D
RIDGE_RELATIVE = 1e-3
#: GCV grid: lambda = s * tr(Cxx) / D for s in 10^GCV_GRID (the floor keeps the solve stable;
#: the top, 10^4, is in effect the prior map)
GCV_GRID = torch.linspace(-8.0, 4.0, 49, dtype=torch.float64)


class RidgeFit(NamedTuple):
    """A solved ridge regression: weight [D_out, D_in], bias [D_out] (float32), the lambda used,
    the relative training error ||Y - X W^T - b||_F / ||Y - mean_y||_F and, for a low-rank fit,
    the factors u [D_out, r], v [D_in, r] of the correction (W = I + u v^T, or u v^T without
    the identity prior)."""

    weight: torch.Tensor
    bias: torch.Tensor
    ridge: float
    rel_error: float
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None


class RidgeStats:
    """Sufficient statistics of token pairs for y = W x + b (float64, O(D^2) memory).

    Holds n, sum x [D_in], sum y [D_out], X^T X [D_in, D_in], X^T Y [D_in, D_out] and sum ||y||^2
    (for the fit error). Statistics live on the device of the first tensors added (float64;
    Apple MPS has no float64, so there they live on the CPU), or on ``device`` when given.
    """

    def __init__(self, d_in: int, d_out: int, device: torch.device | str | None = None) -> None:
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.device = torch.device(device) if device is not None else None
        self.n = 0
        self.sx = self.sy = self.xtx = self.xty = None
        self.yty = 0.0

    def _init(self, device: torch.device) -> None:
        if self.device is None:
            self.device = torch.device("cpu") if device.type == "mps" else device
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=self.device)
        self.sx, self.sy = z(self.d_in), z(self.d_out)
        self.xtx, self.xty = z(self.d_in, self.d_in), z(self.d_in, self.d_out)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate token pairs x [..., D_in], y [..., D_out] (same leading shape).

        Raises:
            ValueError: widths differ from the ones this object was made for, or the token
                counts of x and y differ.
        """
        if x.shape[-1] != self.d_in or y.shape[-1] != self.d_out:
            raise ValueError(f"RidgeStats: expected widths ({self.d_in}, {self.d_out}), got ({x.shape[-1]}, {y.shape[-1]})")
        if self.sx is None:
            self._init(x.device)
        x = x.detach().reshape(-1, self.d_in).to(self.device, torch.float64)
        y = y.detach().reshape(-1, self.d_out).to(self.device, torch.float64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"RidgeStats: {x.shape[0]} input tokens but {y.shape[0]} output tokens")
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.yty += float((y * y).sum())

    def merge(self, other: "RidgeStats") -> "RidgeStats":
        """Add the statistics of ``other`` (same widths) into this one; returns self."""
        if (other.d_in, other.d_out) != (self.d_in, self.d_out):
            raise ValueError("RidgeStats.merge: widths differ")
        if other.n == 0:
            return self
        if self.sx is None:
            self._init(other.sx.device)
        self.n += other.n
        self.sx += other.sx.to(self.device)
        self.sy += other.sy.to(self.device)
        self.xtx += other.xtx.to(self.device)
        self.xty += other.xty.to(self.device)
        self.yty += other.yty
        return self

    @classmethod
    def from_tensors(cls, n, sx, sy, xtx, xty, yty) -> "RidgeStats":
        """Statistics accumulated elsewhere (the online accumulators of the rewritten graph):
        n [] (token pairs), sx [D_in], sy [D_out], xtx [D_in, D_in], xty [D_in, D_out], yty []."""
        st = cls(sx.shape[-1], sy.shape[-1], device=torch.device("cpu"))
        st._init(torch.device("cpu"))
        st.n = int(round(float(n)))
        st.sx += sx.detach().double().cpu()
        st.sy += sy.detach().double().cpu()
        st.xtx += xtx.detach().double().cpu()
        st.xty += xty.detach().double().cpu()
        st.yty = float(yty)
        return st

    def solve(self, ridge: float | None = None, *, identity: bool = False, rank: int | None = None) -> RidgeFit:
        """Closed-form ridge fit on centred data, shrunk toward a prior map.

        The fitted coefficient matrix is the *correction* C: with ``identity=False`` the target is
        y itself (y = C x + b, prior C = 0: a large lambda gives the mean of y); with
        ``identity=True`` (D_in = D_out) the target is the residual r = y - x, i.e. W = I + C
        (prior W = I: a large lambda gives x + mean residual, FastCache's residual reuse).
        With Cxx = V diag(e) V^T and Z = V^T Cxt (t the target, rows z_i):
            C^T = V diag(1 / (e + lambda)) Z,
            RSS(lambda) = tr(Ctt) - sum_i ||z_i||^2 (e_i + 2 lambda) / (e_i + lambda)^2,
            df(lambda) = 1 + sum_i e_i / (e_i + lambda)   (the 1: the intercept),
            GCV(lambda) = n RSS / (n - df)^2   (Golub, Heath, Wahba 1979),
        minimised over lambda = s * tr(Cxx) / D, s in 10^[-8, 4] (the top of the grid is the
        prior itself, which GCV picks when the data cannot support a map, e.g. n < D). Tokens of
        one image are not independent, so GCV tends to pick a small lambda when n >> D; pass
        ``ridge`` to override.

        ``rank=r`` keeps C = U V^T of rank r: reduced-rank regression (Izenman 1975), i.e. the
        truncated SVD of the fitted map weighted by the input covariance: U = the top r
        eigenvectors Q of C Cxx C^T (the covariance of the fitted corrections), V = C^T Q, so
        U V^T = Q Q^T C minimises the training error among rank-r maps with this C; the bias is
        refitted. The approximation then costs O(N D r) instead of O(N D^2).

        Args:
            ridge: None for GCV, or an absolute lambda >= 0.
            identity: shrink toward W = I (fit the residual); needs D_in = D_out.
            rank: None (full) or 1 <= r <= min(D_in, D_out).

        Returns:
            RidgeFit: weight = the full map W [D_out, D_in] (I + C with ``identity``), bias b,
            u [D_out, r] / v [D_in, r] with rank, lambda, rel_error = ||Y - Yhat||_F /
            ||Y - mean_y||_F on the training pairs (Y the block output, not the residual).

        Raises:
            ValueError: no samples were accumulated, ``ridge`` is negative / not finite, ``rank``
                is out of range, or ``identity`` with D_in != D_out.
        """
        if self.n == 0:
            raise ValueError("calibration: no samples accumulated")
        if ridge is not None and (not math.isfinite(ridge) or ridge < 0):
            raise ValueError(f"ridge: expected a finite number >= 0 or None, got {ridge!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(self.d_in, self.d_out)):
            raise ValueError(f"rank: expected an integer in 1..{min(self.d_in, self.d_out)} or None, got {rank!r}")
        if identity and self.d_in != self.d_out:
            raise ValueError(f"identity: needs equal widths, got ({self.d_in}, {self.d_out})")
        n = self.n
        mx, my = (self.sx / n).cpu(), (self.sy / n).cpu()
        cxx = self.xtx.cpu() - n * torch.outer(mx, mx)
        cxy = self.xty.cpu() - n * torch.outer(mx, my)
        cyy_tr = max(self.yty - n * float(my @ my), 0.0)
        if identity:  # target r = y - x: Cxr = Cxy - Cxx, tr(Crr) = tr(Cyy) - 2 tr(Cxy) + tr(Cxx)
            cxt, mt = cxy - cxx, my - mx
            ctt_tr = max(cyy_tr - 2.0 * float(torch.diagonal(cxy).sum()) + float(torch.diagonal(cxx).sum()), 0.0)
        else:
            cxt, mt, ctt_tr = cxy, my, cyy_tr
        eye = torch.eye(self.d_out, self.d_in, dtype=torch.float64) if identity else 0.0

        def finish(ct: torch.Tensor, lam: float, res: float, u=None, v=None) -> RidgeFit:
            b = mt - mx @ ct  # ct = C^T [D_in, D_out]
            rel = math.sqrt(res / cyy_tr) if cyy_tr > 0 else (0.0 if res <= 0 else 1.0)
            f = lambda a: None if a is None else a.float().contiguous()
            return RidgeFit((ct.T + eye).float().contiguous(), b.float().contiguous(), lam, rel, f(u), f(v))

        def rss_of(ct: torch.Tensor) -> float:  # training RSS of C^T, centred
            return max(ctt_tr - 2 * float((ct * cxt).sum()) + float((ct * (cxx @ ct)).sum()), 0.0)

        e, v = torch.linalg.eigh(0.5 * (cxx + cxx.T))
        e = e.clamp_min(0.0)
        scale = float(e.sum()) / self.d_in
        if scale <= 0.0:  # constant inputs: the best map is the prior plus the mean
            zero = torch.zeros(self.d_in, self.d_out, dtype=torch.float64)
            lr = (torch.zeros(self.d_out, rank, dtype=torch.float64), torch.zeros(self.d_in, rank, dtype=torch.float64)) \
                if rank else (None, None)
            return finish(zero, 0.0, ctt_tr, *lr)
        z = v.T @ cxt  # [D_in, D_out]
        z2 = (z * z).sum(1)  # [D_in]

        def rss(lam: torch.Tensor) -> torch.Tensor:  # lam [G] -> [G]
            lam = lam[:, None]
            return (ctt_tr - (z2 * (e + 2 * lam) / (e + lam) ** 2).sum(1)).clamp_min(0.0)

        if ridge is None:
            lams = scale * torch.pow(10.0, GCV_GRID)
            df = 1.0 + (e / (e + lams[:, None])).sum(1)
            # df <= n / 2: GCV's small-lambda limit is degenerate (it interpolates) when n <= D
            gcv = torch.where(df <= 0.5 * n, n * rss(lams) / (n - df).clamp_min(1e-12) ** 2, torch.full_like(df, math.inf))
            lam = float(lams[int(torch.argmin(gcv))]) if torch.isfinite(gcv).any() else RIDGE_RELATIVE * scale
        else:
            lam = float(ridge)
        inv = 1.0 / (e + lam)
        if not torch.isfinite(inv).all():  # lambda = 0 and rank-deficient inputs: pseudo-inverse
            inv = torch.where(e > e.max() * 1e-12, 1.0 / e.clamp_min(1e-300), torch.zeros_like(e))
        ct = v @ (inv[:, None] * z)  # C^T [D_in, D_out]
        if rank is None:
            return finish(ct, lam, rss_of(ct))
        fe, fq = torch.linalg.eigh(ct.T @ cxx @ ct)  # covariance of the fitted corrections
        q = fq[:, torch.argsort(fe, descending=True)[:rank]]  # U [D_out, r]
        vr = ct @ q  # V [D_in, r]: C_r^T = V U^T
        ct_r = vr @ q.T
        return finish(ct_r, lam, rss_of(ct_r), q, vr)

    def fit(self, ridge: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [D_out, D_in], b [D_out]) float32 of ``solve(ridge, **kwargs)``: y ~ F.linear(x, W, b)."""
        r = self.solve(ridge, **kwargs)
        return r.weight, r.bias


@dataclass
class Calibration:
    """Fitted maps and their metadata.

    tensors: "<block>.weight.<s>" [D_out, D_in] and "<block>.bias.<s>" [D_out] (or, with a
        rank, "<block>.u.<s>" [D_out, r], "<block>.v.<s>" [D_in, r] and the bias; a leading
        [K] with K > 1 time buckets), float32, with s the canonical stream index (token count N
        descending).
    metadata: ``format``, ``version``, ``model_class``, ``config_hash`` (sha256 of the
        diffusers config as sorted JSON, "" without ``.config``), ``kind``, ``width`` (of the
        first block's first stream), ``rank`` (null = full), ``buckets`` K, ``timestep_max``,
        ``prior``, ``streams`` {block: [{"tokens": N, "width": D}, ...]}, ``samples`` {block:
        [token pairs per stream]}, ``bucket_samples`` {block: [[per bucket] per stream]},
        ``fit_error`` {block: [relative training error per stream]}, ``bucket_fit_error``,
        ``ridge`` {block: [lambda (list per bucket when K > 1) per stream]}, ``ridge_rule``
        ("gcv" or "fixed").
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        save(self, path)


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
    prev_t: dict[str, float] = {}  # context -> previous timestep
    now = {"bucket": 0}

    def model_pre_hook(module, args, kwargs):
        t = _timestep_value(bind_model(args, kwargs))
        ctx = current_context()
        if t is None:
            if time_buckets > 1:
                raise ValueError("time_buckets: the model was called without a timestep")
            return
        now["bucket"] = time_bucket(t, time_buckets, timestep_max)
        if ctx in prev_t and not t < prev_t[ctx]:  # timestep stopped decreasing: new trajectory
            for k in [k for k in last if k[0] == ctx]:
                del last[k]
        prev_t[ctx] = t

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


def save(cal: Calibration, path: str | Path) -> None:
    """Write ``cal`` as safetensors; each metadata field is stored as a JSON string."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in cal.tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in cal.metadata.items()})


def load(path: str | Path) -> Calibration:
    """Read a calibration file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a fastcache_fx calibration.
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration: no file {str(path)!r} (make one with fastcache_fx.calibrate "
                                "or `fastcache-fx calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"calibration: {path} is not a safetensors file ({e})") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"calibration: {path} is not a fastcache_fx calibration file (no format={FORMAT!r} metadata)")
    return Calibration(tensors, meta)


def _match_streams(name: str, file_streams: list[dict], model_shapes: list[tuple]) -> list[int]:
    """For each model stream (graph order) the file's canonical stream index.

    Exact (N, D) matches first; the rest by rank of N (calibrated at another resolution),
    whose width D must agree. The file may have more streams than the graph: an output the
    graph never uses is not a stream there (the text output of Flux's last single block).
    """
    if len(file_streams) < len(model_shapes):
        raise ValueError(f"calibration: block {name} has {len(file_streams)} stream(s) in file, "
                         f"model has {len(model_shapes)}")
    fmap: list[int | None] = [None] * len(model_shapes)
    free = list(range(len(file_streams)))
    for s, shape in enumerate(model_shapes):
        hit = next((f for f in free if (file_streams[f]["tokens"], file_streams[f]["width"]) == (shape[1], shape[-1])), None)
        if hit is not None:
            fmap[s] = hit
            free.remove(hit)
    rest = sorted((s for s in range(len(model_shapes)) if fmap[s] is None), key=lambda s: -model_shapes[s][1])
    for s, f in zip(rest, free):
        if file_streams[f]["width"] != model_shapes[s][-1]:
            raise ValueError(f"calibration: block {name} stream {s} has width {file_streams[f]['width']} in file, "
                             f"model has {model_shapes[s][-1]}")
        fmap[s] = f
    return fmap


def weight_names(kind: str, rank: int | None) -> tuple[str, ...]:
    """Tensor names per (block, stream) of a calibration: ("weight", "bias") or, low rank,
    ("u", "v", "bias")."""
    return ("u", "v", "bias") if rank is not None else ("weight", "bias")


def weight_shapes(d: int, rank: int | None, buckets: int) -> dict[str, tuple]:
    """Shapes of the weight inputs of one stream of width ``d``: weight [D, D] / u, v [D, r] /
    bias [D], with a leading [K] when ``buckets`` K > 1."""
    lead = (buckets,) if buckets > 1 else ()
    shapes = {"weight": (d, d), "bias": (d,)} if rank is None else {"u": (d, rank), "v": (d, rank), "bias": (d,)}
    return {k: lead + v for k, v in shapes.items()}


def load_calibration(path: str | Path, regions, kind: str, model_info: dict | None = None,
                     rank: int | None = None, time_buckets: int = 1) -> dict[str, torch.Tensor]:
    """The weight inputs of the graph pass, from a calibration file.

    Args:
        path: a file written by ``calibrate`` / ``fastcache-fx calibrate``.
        regions: ``BlockRegion``s (``find_blocks(gm).regions``).
        kind: the approximation the graph uses ("linear" or "residual_linear").
        model_info: optional {"model_class", "config_hash"} (``model_info(model)``) to check the
            file against; empty values are not compared.
        rank, time_buckets: what the config asks for (``FastCacheConfig.rank / time_buckets``);
            the file must have been fitted with the same.

    Returns:
        {"<r.name>.<key>.<s>": tensor} float32 for every region r, stream s in the region's own
        (graph) order and key in ``weight_names(kind, rank)``, shaped as ``weight_shapes``:
        exactly the names of the ``WeightSpec``s that ``apply_block_cache`` creates.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a calibration file; fitted for another kind, model (class or config),
            rank or number of time buckets; no map for a block of ``regions``; fewer streams in
            the file than in the graph; another width. The message names what differs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    cal = load(path)
    meta = cal.metadata
    if meta.get("kind") != kind:
        raise ValueError(f"calibration: {path} was fitted for approx={meta.get('kind')!r}, the graph uses approx={kind!r}")
    for k in ("model_class", "config_hash"):
        if model_info and model_info.get(k) and meta.get(k) and model_info[k] != meta[k]:
            raise ValueError(f"calibration: {path} is for another model: {k}={meta[k]!r} in file, "
                             f"the model has {k}={model_info[k]!r}")
    if meta.get("rank") != rank:
        raise ValueError(f"calibration: {path} has rank={meta.get('rank')!r}, the config asks for rank={rank!r} "
                         "(calibrate with the same rank)")
    if int(meta.get("buckets", 1)) != time_buckets:
        raise ValueError(f"calibration: {path} has time_buckets={meta.get('buckets', 1)!r}, the config asks for "
                         f"time_buckets={time_buckets!r}")
    streams = meta.get("streams", {})
    out: dict[str, torch.Tensor] = {}
    for r in regions:
        if r.name not in streams:
            raise ValueError(f"calibration: no map for block {r.name} in {path}")
        shapes = r.stream_shapes
        for s, f in enumerate(_match_streams(r.name, streams[r.name], shapes)):
            for key, shape in weight_shapes(shapes[s][-1], rank, time_buckets).items():
                t = cal.tensors.get(f"{r.name}.{key}.{f}")
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"calibration: block {r.name} stream {s}: tensor {r.name}.{key}.{f} "
                                     f"missing or not {list(shape)}")
                out[f"{r.name}.{key}.{s}"] = t.float().contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# the block-stack map of token selection (static_approx "linear" / "cached_linear")
# ----------------------------------------------------------------------------------------------

#: calibration kinds of the block-stack map, by the ``static_approx`` they serve
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
    prev_t: dict[str, float] = {}

    def model_pre_hook(module, args, kwargs):
        t = _timestep_value(bind_model(args, kwargs))
        ctx = current_context()
        if t is not None:
            if ctx in prev_t and not t < prev_t[ctx]:  # timestep stopped decreasing: new trajectory
                prev.pop(ctx, None)
            prev_t[ctx] = t

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
