"""Which compiled graphs belong to which user model.

A Dynamo backend never sees the user's ``nn.Module``, only its parameters (lifted to graph
inputs). Each model therefore gets a ``ModelEntry`` found through the identity of its
parameter tensors; ``stats(model)`` and ``reset(model)`` look it up the same way. Two models
never share parameters, so they never share state.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch

_ENTRIES: dict[int, tuple[weakref.ref, "ModelEntry"]] = {}


class ModelEntry:
    """All fastcache graphs compiled for one model, and which one ran last."""

    def __init__(self) -> None:
        self.graphs: list = []
        self.last_graph = None
        self.replay = None  # a runtime.replay.DecisionReplay while replay_decisions() is active

    def note_call(self, graph) -> bool:
        """Record that ``graph`` runs now; True when another graph ran last (shape, dtype,
        device or batch changed), in which case the caller must drop its cached state."""
        changed = self.last_graph is not None and self.last_graph is not graph
        self.last_graph = graph
        return changed

    def reset(self) -> None:
        for g in self.graphs:
            g.reset()


def _forget(key: int) -> None:
    _ENTRIES.pop(key, None)


def entry_for_params(params: Iterable[torch.Tensor]) -> ModelEntry:
    """The entry owning any of ``params``, or a new one registered under all of them."""
    params = list(params)
    entry = next((e for p in params if (e := _lookup_one(p)) is not None), None) or ModelEntry()
    for p in params:
        if _lookup_one(p) is None:
            key = id(p)
            _ENTRIES[key] = (weakref.ref(p, lambda _r, k=key: _forget(k)), entry)
    return entry


def _lookup_one(p: torch.Tensor) -> ModelEntry | None:
    hit = _ENTRIES.get(id(p))
    if hit is not None and hit[0]() is p:
        return hit[1]
    return None


def unwrap(model):
    """The nn.Module behind a pipeline (``.transformer``) or a compiled module (``._orig_mod``)."""
    if not isinstance(model, torch.nn.Module) and hasattr(model, "transformer"):
        model = model.transformer
    return getattr(model, "_orig_mod", model)


def lookup(model) -> ModelEntry | None:
    """The entry of ``model`` (module, compiled module or pipeline), None if never compiled."""
    module = unwrap(model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module or a pipeline with .transformer, got {type(model).__name__}")
    for p in module.parameters():
        e = _lookup_one(p)
        if e is not None:
            return e
    return None
