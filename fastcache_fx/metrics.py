"""The quality metrics the library itself reports (``tune``): PSNR. The demo's image metrics
(SSIM, class accuracy, digits-FID) live in ``reference.metrics``, which re-uses these."""

from __future__ import annotations

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, 10 log10(R^2 / MSE); ``a``, ``b``: [B, ...]
    (one sample per row); returns [B] float64 (inf where equal)."""
    mse = (a.double() - b.double()).flatten(1).pow(2).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


#: dB reported for identical samples (MSE 0)
PSNR_CAP = 100.0


def psnr_db(images: torch.Tensor, reference: torch.Tensor, data_range: float | None = 2.0,
            cap: float = PSNR_CAP) -> float:
    """The PSNR every table of this project reports: the mean over samples of ``psnr`` (dB), each
    capped at ``cap`` (identical samples count as ``cap``). ``images``, ``reference``: [B, ...]
    (one sample per row, same seeds). ``data_range`` R: 2 for images in [-1, 1]; None: the
    reference's max - min (model outputs of any range)."""
    if data_range is None:
        data_range = float(reference.max() - reference.min()) or 1.0
    return float(psnr(images, reference, data_range).clamp_max(cap).mean())
