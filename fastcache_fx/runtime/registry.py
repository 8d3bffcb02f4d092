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

from .live import LiveRequests

_ENTRIES: dict[int, tuple[weakref.ref, "ModelEntry"]] = {}


class ModelEntry:
    """All fastcache graphs compiled for one model, and the requests holding state in them
    (``requests``: ``runtime.live.LiveRequests``, which also knows which graph computed each
    block last in each request)."""

    def __init__(self) -> None:
        self.graphs: list = []
        self.requests = LiveRequests(self)
        self.replay = None  # a runtime.replay.DecisionReplay while replay_decisions() is active
        self.regional = None  # runtime.regional.RegionalModel in regional compilation
        self.warned = False  # the one fallback warning of this model was given
        self.uncompiled_calls = 0  # calls no compiled graph served (runtime.uncompiled)
        self.quality = None  # runtime.quality.QualityTarget: per-step output-budget controls (target_psnr)
        self.uncompiled_reason: str | None = None
        self.preparing = False  # runtime.prepare will prepare the model and trace it again (no fallback warning)
        self.module = None  # weakref to the model of a bare torch.compile (runtime.prepare), names its blocks
        # (request id, context) -> the timestep input a graph of the model holding it saw
        # last: graphs without it (fragments after a graph break) run their clock on it
        self.timesteps: dict[tuple[str, str], torch.Tensor] = {}

    #: the most (request, context) timesteps kept (``timesteps``), oldest dropped first
    MAX_TIMESTEPS = 256

    def see_timestep(self, key: tuple[str, str], timestep) -> None:
        """Keep ``timestep`` (a reference: no op on the hot path of models that never read it) for
        the graphs of the same call that lack the input (``passes.extra_io.TIMESTEP_CONTROL``,
        ``timestep_of``)."""
        if not isinstance(timestep, torch.Tensor) or timestep.numel() == 0:
            return
        self.timesteps.pop(key, None)
        self.timesteps[key] = timestep
        while len(self.timesteps) > self.MAX_TIMESTEPS:
            self.timesteps.pop(next(iter(self.timesteps)))

    def timestep_of(self, key: tuple[str, str], device) -> torch.Tensor | None:
        """The first element [] float32 on ``device`` of the timestep ``see_timestep`` kept for
        ``key``, or None."""
        t = self.timesteps.get(key)
        return None if t is None else t.detach().reshape(-1)[0].to(device=device, dtype=torch.float32, copy=True)

    def note_call(self, graph, key: tuple = (), request: str = "") -> bool:
        """Record that ``graph`` computes its blocks now for the call of ``request`` (an id) with
        shape ``key``; True when another graph, or this graph at another shape, computed one of
        those blocks last in that request (shape, dtype, device or batch changed): the caller must
        drop the request's cached state. Graphs with disjoint blocks (a model split by graph
        breaks) never invalidate each other."""
        return self.requests.note_call(graph, key, request)

    def end_request(self, request: str) -> None:
        """Free the cache state of request ``request`` (an id) in every graph (``runtime.requests``)."""
        self.requests.end(request)
        for k in [k for k in list(self.timesteps) if k[0] == request]:
            self.timesteps.pop(k, None)

    def drop_state(self) -> None:
        """Forget every graph's cache state (statistics stay): the next step starts a trajectory."""
        with self.requests.lock:
            for g in self.graphs:
                g.drop_state()
            self.requests.clear()

    def reset(self) -> None:
        """Forget every graph's cache state and statistics."""
        with self.requests.lock:
            for g in self.graphs:
                g.reset()
            self.requests.clear()
            self.requests.ended.clear()
            self.requests.evictions = 0
        self.uncompiled_calls = 0


def _forget(key: int) -> None:
    _ENTRIES.pop(key, None)


#: the entry of blocks compiled regionally without ``enable_fastcache`` (a bare
#: ``compile_repeated_blocks(backend="fastcache")``): nothing tells their models apart
SHARED_REGIONAL = ModelEntry()


_CACHED_CALLS = [0]


def count_cached_call() -> None:
    """A graph with the cache ran (any model): ``FallbackRuntime`` tells glue from a model the
    backend does not understand by whether one ran between its first and second call."""
    _CACHED_CALLS[0] += 1


def cached_calls() -> int:
    """Calls of graphs with the cache so far, all models (``count_cached_call``)."""
    return _CACHED_CALLS[0]


def entry_for_params(params: Iterable[torch.Tensor], default: ModelEntry | None = None) -> ModelEntry:
    """The entry owning any of ``params``, or ``default`` (a new entry when None), registered
    under all of them."""
    params = list(params)
    entry = next((e for p in params if (e := _lookup_one(p)) is not None), None) or default or ModelEntry()
    for p in params:
        if _lookup_one(p) is None:
            key = id(p)
            _ENTRIES[key] = (weakref.ref(p, lambda _r, k=key: _forget(k)), entry)
    return entry


def entry_of_param(p: torch.Tensor) -> ModelEntry | None:
    """The entry a parameter tensor is registered under, or None."""
    return _lookup_one(p)


def _lookup_one(p: torch.Tensor) -> ModelEntry | None:
    hit = _ENTRIES.get(id(p))
    if hit is not None and hit[0]() is p:
        return hit[1]
    return None


def forget(module: torch.nn.Module) -> None:
    """Drop the entry of ``module``'s parameters (``disable_fastcache``): its state and statistics
    go; a later compile starts a new entry."""
    entries = {}
    for p in module.parameters():
        hit = _ENTRIES.get(id(p))
        if hit is not None and hit[0]() is p:
            entries[id(hit[1])] = hit[1]
            del _ENTRIES[id(p)]
    for e in entries.values():
        e.reset()
        e.regional = None


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
