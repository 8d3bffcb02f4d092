"""Image-quality metrics for the reference model: PSNR, SSIM, class accuracy, digits-FID.

Images are [B, 1, H, W] float tensors in [-1, 1] (data range 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..metrics import PSNR_CAP, psnr, psnr_db  # noqa: F401 (re-exported: the reference API)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13) with a uniform ``window`` x
    ``window`` window and K1=0.01, K2=0.03, as scikit-image's default; [B].

    Windows are taken where they fit ("valid"), so H and W must be >= ``window``.
    """
    if a.shape != b.shape or a.shape[-1] < window or a.shape[-2] < window:
        raise ValueError(f"ssim: images must share a shape with H, W >= {window}, got {tuple(a.shape)}")
    a, b = a.double(), b.double()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean = lambda x: F.avg_pool2d(x, window, stride=1)
    n = window * window
    cov_norm = n / (n - 1)  # unbiased (co)variances, as scikit-image
    mu_a, mu_b = mean(a), mean(b)
    va = cov_norm * (mean(a * a) - mu_a ** 2)
    vb = cov_norm * (mean(b * b) - mu_b ** 2)
    cab = cov_norm * (mean(a * b) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return s.flatten(1).mean(1)


def class_accuracy(classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` the classifier assigns to the requested ``labels``."""
    with torch.no_grad():
        return float((classifier(images).argmax(1) == torch.as_tensor(labels)).float().mean())


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, d] (Heusel et al. 2017):
    ||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2}).

    Tr (C1 C2)^{1/2} = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the symmetric PSD
    matrix C1^{1/2} C2 C1^{1/2} (the same as those of C1 C2), from ``scipy.linalg.eigh``: exact for
    the rank-deficient covariances of N <= d samples, where ``sqrtm(C1 C2)`` warns that the matrix
    is singular."""
    from scipy import linalg

    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    e1, v1 = linalg.eigh(c1)
    root1 = (v1 * np.sqrt(np.clip(e1, 0.0, None))) @ v1.T
    lam = linalg.eigvalsh(root1 @ c2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.clip(lam, 0.0, None)).sum())


def digits_fid(classifier, generated: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """digits-FID: Frechet distance of the classifier's penultimate features [N, 128] between
    ``generated`` and ``real`` digits (default: the held-out split)."""
    if real is None:
        from .data import train_test_split

        real = train_test_split()[1][0]
    with torch.no_grad():
        fg = classifier.features(generated).numpy()
        fr = classifier.features(real).numpy()
    return frechet_distance(fg, fr)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, col_major: bool = False, scale: int = 4) -> None:
    """Save [B, 1, H, W] images in [-1, 1] as a PNG grid with matplotlib (nearest upscaling).

    With ``col_major`` the i-th image goes to column i // (B / nrow) (one class per column).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = ((images.detach().float().clamp(-1, 1) + 1) / 2)[:, 0].numpy()
    b, h, w = x.shape
    ncol = nrow
    nr = int(np.ceil(b / ncol))
    canvas = np.ones((nr * (h + 1) + 1, ncol * (w + 1) + 1))
    for i in range(b):
        r, c = (i % nr, i // nr) if col_major else (i // ncol, i % ncol)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[i]
    canvas = np.kron(canvas, np.ones((scale, scale)))
    plt.imsave(str(path), canvas, cmap="gray", vmin=0, vmax=1)
