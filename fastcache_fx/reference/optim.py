"""What both reference-model trainers share: the learning-rate schedule and one optimizer step."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    """The learning rate at ``step`` of ``total``: linear warmup over ``warmup`` steps, then cosine
    decay from ``base`` to 0.1 ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def optimizer_step(model, ema, opt, loss: torch.Tensor, step: int, ema_decay: float) -> None:
    """One AdamW step with gradient clipping (norm 1.0), then the EMA update with the warmup decay
    min(ema_decay, (1 + step) / (10 + step)) (both reference models train so)."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)
