"""Closed-form ridge regression from sufficient statistics, lambda by generalized cross-validation
(ESL sec. 3.4.1; Golub, Heath, Wahba 1979), optionally reduced rank: ``RidgeStats``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

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
        _check_solve(self, ridge, identity, rank)
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

        lam = _gcv_lambda(e, z2, ctt_tr, n, scale) if ridge is None else float(ridge)
        inv = 1.0 / (e + lam)
        if not torch.isfinite(inv).all():  # lambda = 0 and rank-deficient inputs: pseudo-inverse
            inv = torch.where(e > e.max() * 1e-12, 1.0 / e.clamp_min(1e-300), torch.zeros_like(e))
        ct = v @ (inv[:, None] * z)  # C^T [D_in, D_out]
        if rank is None:
            return finish(ct, lam, rss_of(ct))
        q, vr = _reduced_rank(ct, cxx, rank)
        ct_r = vr @ q.T
        return finish(ct_r, lam, rss_of(ct_r), q, vr)

    def fit(self, ridge: float | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [D_out, D_in], b [D_out]) float32 of ``solve(ridge, **kwargs)``: y ~ F.linear(x, W, b)."""
        r = self.solve(ridge, **kwargs)
        return r.weight, r.bias


def _check_solve(stats: RidgeStats, ridge, identity: bool, rank) -> None:
    """The argument checks of ``RidgeStats.solve`` (its ``ValueError``s)."""
    if stats.n == 0:
        raise ValueError("calibration: no samples accumulated")
    if ridge is not None and (not math.isfinite(ridge) or ridge < 0):
        raise ValueError(f"ridge: expected a finite number >= 0 or None, got {ridge!r}")
    top = min(stats.d_in, stats.d_out)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= top):
        raise ValueError(f"rank: expected an integer in 1..{top} or None, got {rank!r}")
    if identity and stats.d_in != stats.d_out:
        raise ValueError(f"identity: needs equal widths, got ({stats.d_in}, {stats.d_out})")


def _gcv_lambda(e: torch.Tensor, z2: torch.Tensor, ctt_tr: float, n: float, scale: float) -> float:
    """lambda minimising GCV(lambda) = n RSS / (n - df)^2 (Golub, Heath, Wahba 1979) over
    ``scale`` * 10^GCV_GRID, from the eigenvalues ``e`` [D_in] of Cxx and the squared row norms
    ``z2`` [D_in] of V^T Cxt (``RidgeStats.solve``); RIDGE_RELATIVE * scale if none is finite."""
    lams = scale * torch.pow(10.0, GCV_GRID)
    lam = lams[:, None]
    rss = (ctt_tr - (z2 * (e + 2 * lam) / (e + lam) ** 2).sum(1)).clamp_min(0.0)
    df = 1.0 + (e / (e + lam)).sum(1)
    # df <= n / 2: GCV's small-lambda limit is degenerate (it interpolates) when n <= D
    gcv = torch.where(df <= 0.5 * n, n * rss / (n - df).clamp_min(1e-12) ** 2, torch.full_like(df, math.inf))
    return float(lams[int(torch.argmin(gcv))]) if torch.isfinite(gcv).any() else RIDGE_RELATIVE * scale


def _reduced_rank(ct: torch.Tensor, cxx: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [D_out, r], V [D_in, r]) of reduced-rank regression (Izenman 1975): U the top r
    eigenvectors of C Cxx C^T (the covariance of the fitted corrections), V = C^T U; C_r^T = V U^T."""
    fe, fq = torch.linalg.eigh(ct.T @ cxx @ ct)
    q = fq[:, torch.argsort(fe, descending=True)[:rank]]
    return q, ct @ q
