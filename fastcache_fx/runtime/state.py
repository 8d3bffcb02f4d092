"""GraphRuntime: calls one rewritten, compiled graph and owns its cache state between calls.

State is a list of tensors laid out by the graph contract's state specs
(``contract.GraphContract.state``, via ``BlockCacheResult.contract``); there is one list per
(request, CFG context) (``runtime.requests``: concurrent requests on one compiled graph never
share state), created lazily (diffusers StateManager style), sized for the call's shape (a graph
traced with symbolic shapes serves many shapes: ``runtime.shapes.ShapeBinder``), and dropped on
``reset()``, when its request ends or is dropped by the bound on live requests
(``runtime.live``), when the call's shape differs from the one the state was built for, or when
another graph computed the same blocks since this one last ran in the request (a change of shape,
dtype, device or batch size that Dynamo served with another graph); a graph that differs from that
one in nothing the state describes (a recompile on a guard over Python state) takes the request's
state over instead. Calls may come from many threads at once: the bookkeeping runs under the
model's lock, the compiled graph outside it. ``FallbackRuntime`` is a graph compiled without the
cache; it is registered too, so ``stats()`` says so.
"""

from __future__ import annotations

import collections
import threading
import warnings
import weakref
from typing import Callable

import torch

from ..passes.block_cache import BlockCacheResult
from ..passes.extra_io import TIMESTEP_CONTROL
from ..ops import decision as D
from .context import current_context
from .records import StepRecord, TraceLog
from .requests import current_request, end_finished
from . import registry
from .registry import ModelEntry
from .shapes import ShapeBinder


def state_of(states: dict, context: str, request: str | None = None):
    """``states[(request, context)]``; with ``request`` None, of the request that ran ``context``
    last (dicts keep insertion order and a step stores its new state under its key again).

    Raises:
        KeyError: no live state of that context (and request)."""
    if request is not None:
        return states[(request, context)]
    hits = [v for (_, c), v in list(states.items()) if c == context]
    if not hits:
        raise KeyError(context)
    return hits[-1]


class GraphRuntime:
    """The callable the backend hands to Dynamo for one graph.

    Args:
        entry: the model's registry entry (shared by all graphs of the model).
        layout: what the block-cache pass did (input/output layout, block names, ND per block).
        compiled: the lowered graph (Inductor), called with user inputs + extra inputs.
        weights: tensors for the ``WeightSpec`` inputs (calibrated maps), in layout order.
        device: where state tensors live.
        trace_steps: steps of decisions kept for ``stats()`` (per request, and in all).
        clone_outputs: copy outputs that a CUDA-graph replay would overwrite.
        binder: binds the size symbols of a dynamic-shape graph (None: static graph).
        significance_level: alpha, for the per-shape chi-square bound of a dynamic-shape graph.
        trace_requests, max_live_requests: the bounds of ``FastCacheConfig`` (set on the model's
            ``runtime.live.LiveRequests``).
    """

    kind = "fastcache"
    fallback = None

    def __init__(self, entry: ModelEntry, layout: BlockCacheResult, compiled, weights: dict[str, torch.Tensor],
                 device: torch.device, trace_steps: int, clone_outputs: bool = False,
                 binder: ShapeBinder | None = None, significance_level: float = 0.05,
                 trace_requests: int = 64, max_live_requests: int = 8) -> None:
        self.entry = entry
        self.layout = layout
        self.compiled = compiled
        self.weights = weights
        self.device = device
        self.clone_outputs = clone_outputs
        self.binder = binder if binder is not None and not binder.static else None
        self.alpha = significance_level
        self.states: dict[tuple[str, str], list[torch.Tensor]] = {}  # (request id, context) -> state
        self.keys: dict[tuple[str, str], tuple] = {}  # the shape key each state was built for
        self.trace = TraceLog(trace_steps, trace_requests)
        self.calls = 0
        self.contract = layout.contract
        self._output_error_at = self.contract.state_position("output.step_error")
        # -1 everywhere: every block decides live (the "force" control)
        self.live = {c.name: c.initial(device) for c in self.contract.controls}
        self._q_ratio: dict[tuple, torch.Tensor] = {}
        self.online = None  # runtime.online.OnlineCalibration with calibration="online" (accumulator inputs)
        self.token_merge = None  # passes.token_merge result, read by stats()
        self.timestep_at = None  # position of the timestep input (drives block graphs' clock)
        self.source = ""  # the code of the Dynamo graph it was built from ("": unknown, never taken over)
        entry.requests.configure(max_live_requests, trace_requests)
        entry.graphs.append(self)

    @property
    def blocks(self) -> list[str]:
        return self.layout.blocks

    @property
    def dynamic(self) -> bool:
        return self.binder is not None

    # state -------------------------------------------------------------------------------
    def drop_state(self) -> None:
        """Forget every context's cache state (the next step of each context is computed fully)."""
        self.states.clear()
        self.keys.clear()

    def state_of(self, context: str = "default", request: str | None = None) -> list[torch.Tensor]:
        """The live state list of ``context`` in ``request`` (an id; None: the request that ran that
        context last), for inspection. Raises KeyError when there is none."""
        return state_of(self.states, context, request)

    def drop_request(self, request: str, context: str | None = None) -> None:
        """Forget the state of ``request`` (an id): of its ``context``, or of all its contexts."""
        for k in [k for k in list(self.states) if k[0] == request and (context is None or k[1] == context)]:
            self.states.pop(k, None)
            self.keys.pop(k, None)

    def reset(self) -> None:
        """``drop_state`` and forget the statistics (``stats()`` describes calls after this)."""
        self.drop_state()
        self.trace.clear()
        self.calls = 0

    def state_bytes(self, request: str | None = None) -> dict[str, int]:
        """Bytes of live cache state per block (all contexts; of one request id if given), ``""``
        for trajectory state."""
        out: dict[str, int] = {}
        for (rid, _), st in list(self.states.items()):
            if request is not None and rid != request:
                continue
            for spec, t in zip(self.layout.state, st):
                block = next((b for b in self.layout.blocks if spec.name.startswith(b + ".")), "")
                out[block] = out.get(block, 0) + t.numel() * t.element_size()
        return out

    def _take_over(self, previous: tuple | None, key: tuple, request: str) -> None:
        """Continue the trajectory of the graph this one replaces when the two differ in nothing
        the cache state describes: the same Dynamo graph (its code: the same ops, parameters and
        constants, so a LoRA loaded or fused, which changes it, still starts over), the same
        blocks, the same state specs (names, static shapes, dtypes) and the same call shape.
        Dynamo recompiles on guards over Python state too: diffusers' context-parallel hooks
        cache the forward's signature on the first call
        (``ModuleForwardMetadata.cached_parameter_indices``), so a bare ``torch.compile`` of a
        parallelised model gets a second, identical graph at the second step; starting fresh
        there (warm-up again) made every rank diverge from one process. ``previous``: (graph,
        shape key) from ``runtime.live.LiveRequests.note_call``. The state tensors of ``request``
        (an id; all its contexts) move (the old graph drops them); its statistics and the online
        accumulators stay where they are."""
        if previous is None:
            return
        old, old_key = previous
        if (old is self or old_key != key or not isinstance(old, GraphRuntime) or not self.source
                or old.source != self.source or self.binder is not None
                or old.binder is not None or old.blocks != self.blocks or old.device != self.device
                or _state_layout(old.contract) != _state_layout(self.contract)):
            return
        for k in [k for k in old.states if k[0] == request]:
            self.states[k], self.keys[k] = old.states[k], old.keys[k]
        old.drop_request(request)

    def _state_for(self, ctx: tuple[str, str], key: tuple) -> list[torch.Tensor]:
        st = self.states.get(ctx)
        if st is None or self.keys.get(ctx) != key:
            shape = tuple if self.binder is None else (lambda s: tuple(self.binder.evaluate(s, key)))
            st = self.states[ctx] = self.contract.initial_state(self.device, shape)
            self.keys[ctx] = key
        return st

    def _controls(self, key: tuple) -> dict[str, torch.Tensor]:
        controls = dict(self.live)
        if "q_ratio" in controls:  # symbolic ND: chi2.ppf(1 - alpha, ND) / ND for this shape
            q = self._q_ratio.get(key)
            if q is None:
                nds = self.binder.evaluate(self.layout.dofs, key)
                q = self._q_ratio[key] = torch.tensor([D.chi2_quantile_ratio(self.alpha, nd) for nd in nds],
                                                      dtype=torch.float32, device=self.device)
            controls["q_ratio"] = q
        if self.entry.replay is not None and "force" in controls:
            row = self.entry.replay.next_row(len(self.layout.blocks))
            if row is not None:
                controls["force"] = row.to(self.device)
        return controls

    # call --------------------------------------------------------------------------------
    def __call__(self, *args):
        registry.count_cached_call()
        if self.timestep_at is not None and self.entry.regional is not None:
            from .regional import drive_step_clock

            drive_step_clock(self.entry, args[self.timestep_at])
        key = self.binder.key(args) if self.binder is not None else ()
        end_finished()
        req, ctx = current_request(), current_context()
        sk = (req.id, ctx)
        if self.timestep_at is not None:
            self.entry.see_timestep(sk, args[self.timestep_at])
        live = self.entry.requests
        with live.lock:
            evicted = live.admit(req, ctx)
            if self.entry.note_call(self, key, req.id):
                self.drop_request(req.id)
                self._take_over(live.previous, key, req.id)
            state = self._state_for(sk, key)
            controls = self._controls(key)
            if TIMESTEP_CONTROL in controls:  # a fragment without the input
                t = self.entry.timestep_of(sk, self.device)
                if t is not None:
                    controls[TIMESTEP_CONTROL] = t
            if self.entry.quality is not None and "output.weight" in controls:  # target_psnr, sampler known
                controls.update(self.entry.quality.controls(ctx, self.device))
            extra = self.contract.bind(state, controls, self.weights, self.online.accum if self.online else None)
        try:
            outs = self.compiled(*args, *extra)  # Dynamo's convention for backend results: positional args
        except BaseException:
            with live.lock:
                self.states.pop(sk, None)  # nothing half-updated survives a failed call
            raise
        got = self.contract.split(outs)
        new_state, (delta, thr, ok) = got.state, got.trace
        if self.clone_outputs:
            new_state = [t.clone() for t in new_state]
            delta, thr, ok = delta.clone(), thr.clone(), ok.clone()
        at = self._output_error_at
        with live.lock:
            if self.states.get(sk) is state:  # else dropped meanwhile (request ended or evicted)
                del self.states[sk]  # re-inserted: the dict's order is the order of the last steps
                self.states[sk] = new_state
            self.trace.append(StepRecord(ctx, new_state[self.contract.step_index], delta, thr, ok,
                                         output_error=None if at is None else new_state[at], request=req.id,
                                         evicted=evicted))
            if self.entry.quality is not None and at is not None:
                self.entry.quality.after_step(ctx, new_state[at])
            if self.online is not None:  # may refit and swap self.weights
                self.online.after_step(got.accums, self.weights, clone=self.clone_outputs)
            self.calls += 1
        return self.contract.user_result(got.user)


def _state_layout(contract) -> list[tuple]:
    """(name, shape, dtype) of each state spec, in order (what ``GraphRuntime._take_over`` compares)."""
    return [(s.name, tuple(s.shape), s.dtype) for s in contract.state]


class FallbackRuntime:
    """A graph of the model compiled with plain Inductor and no cache, registered so that
    ``stats()`` reports it: every call counts as computing each of its ``blocks`` fully.

    A graph without blocks is often a fragment of a model that Dynamo split at a graph break
    (Mochi's rotary embedding, HiDream's timestep embedding): the glue before or after the
    fragments that hold the blocks. It is then of kind ``"glue"`` (no warning, no fallback
    reason). A model none of whose graphs holds blocks is one the backend does not understand:
    kind ``"fallback"``, one warning per model at the second call of such a graph (by then
    every fragment of the first call has been compiled), and ``stats()["fallback"]`` says why.

    Args:
        entry: the model's registry entry. compiled: the lowered graph.
        reason: why the cache was not applied.
        blocks: names of the blocks the graph computes (empty for a graph without blocks).
        timestep_at: position of the model's timestep among the inputs (it drives the step
            clock of the model's block graphs, ``runtime.regional.drive_step_clock``), or None.
    """

    dynamic = False
    online = None
    token_merge = None

    def __init__(self, entry: ModelEntry, compiled, reason: str, blocks: list[str],
                 timestep_at: int | None = None) -> None:
        self.entry = entry
        self.timestep_at = timestep_at  # position of the model's timestep input, if the graph has it
        self.compiled = compiled
        self.reason = reason
        self.blocks = list(blocks)
        self.calls = 0
        self._cached_at_first = 0  # registry.cached_calls() at the first call
        self.trace: collections.deque = collections.deque(maxlen=0)
        entry.graphs.append(self)

    def drop_request(self, request: str, context: str | None = None) -> None:
        pass

    @property
    def kind(self) -> str:
        """"glue" when another graph of the model carries the cache, else "fallback"."""
        cached = any(not isinstance(g, FallbackRuntime) for g in self.entry.graphs)
        return "glue" if cached and not self.blocks else "fallback"

    @property
    def fallback(self) -> str | None:
        return self.reason if self.kind == "fallback" else None

    def drop_state(self) -> None:
        pass

    def reset(self) -> None:
        self.calls = 0

    def state_bytes(self, request: str | None = None) -> dict[str, int]:
        return {}

    def __call__(self, *args):
        if self.timestep_at is not None:
            from .regional import drive_step_clock

            drive_step_clock(self.entry, args[self.timestep_at])
            self.entry.see_timestep((current_request().id, current_context()), args[self.timestep_at])
        if self.blocks:
            self.entry.note_call(self, (), current_request().id)
        if self.calls == 0:
            self._cached_at_first = registry.cached_calls()
        # a graph with the cache ran since this one's first call: glue of a model split at graph
        # breaks whose fragment has an entry of its own (a submodule without parameters), no warning
        if (self.calls == 1 and not self.entry.warned and self.kind == "fallback" and not self.entry.preparing
                and registry.cached_calls() == self._cached_at_first):
            self.entry.warned = True
            warnings.warn(f"fastcache: {self.reason}; compiled with plain Inductor", stacklevel=2)
        self.calls += 1
        return self.compiled(*args)


class SharedGraph:
    """What Dynamo calls for one compiled whole-transformer graph.

    Dynamo reuses a compiled graph for another model of the same class compiled with the same
    backend (parameters are graph inputs, and ``backend="fastcache"`` is one function), so one
    compiled graph can serve several models. Each model, told apart by the identity of the
    parameter tensors a call passes, gets its own GraphRuntime (cache state, statistics) around
    the shared compiled graph: two models never share state.

    Args:
        first: the runtime of the model the graph was compiled for.
        param_at: positions of the parameter inputs in a call.
        make: ``make(entry)`` builds the GraphRuntime of another model's entry.
    """

    def __init__(self, first: GraphRuntime, param_at: list[int], make: Callable[[ModelEntry], GraphRuntime]) -> None:
        self.param_at = param_at
        self.make = make
        self.runtimes: dict[int, tuple[weakref.ref, GraphRuntime]] = {}
        self.first = first
        self._lock = threading.Lock()  # two threads meeting a new model build one runtime

    def _runtime(self, args) -> GraphRuntime:
        if not self.param_at:
            return self.first
        p = args[self.param_at[0]]
        hit = self.runtimes.get(id(p))
        if hit is not None and hit[0]() is p:
            return hit[1]
        with self._lock:
            entry = registry.entry_for_params([args[i] for i in self.param_at])
            rt = self.first if entry is self.first.entry else next(
                (g for g in entry.graphs if getattr(g, "compiled", None) is self.first.compiled), None) or self.make(entry)
            self.runtimes[id(p)] = (weakref.ref(p), rt)
        return rt

    def __call__(self, *args):
        return self._runtime(args)(*args)
