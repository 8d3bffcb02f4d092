"""Approximation kinds (``FastCacheConfig.approx``): one strategy object per kind, one module each.

Adding a kind: a module with a subclass of ``base.Approximation`` and one line in ``KINDS``
(docs/architecture.md, "Adding an approximation kind")."""

from __future__ import annotations

from .base import Approximation, Slots
from .linear import Linear
from .residual import RESIDUAL
from .residual_linear import ResidualLinear
from .taylor import Taylor

#: every kind by its ``FastCacheConfig.approx`` name
KINDS: dict[str, Approximation] = {k.name: k for k in (RESIDUAL, Linear(), ResidualLinear(), Taylor())}


def get(name: str) -> Approximation:
    """The kind named ``name``.

    Raises:
        ValueError: an unknown name (the message lists the kinds)."""
    if name not in KINDS:
        raise ValueError(f"FastCacheConfig.approx: expected one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]


def resolve(config) -> Approximation:
    """The kind a graph is built with for ``config`` (a calibrated kind without a calibration
    file falls back to residual reuse, with one warning)."""
    return get(config.approx).resolve(config)


__all__ = ["Approximation", "KINDS", "Slots", "get", "resolve"]
