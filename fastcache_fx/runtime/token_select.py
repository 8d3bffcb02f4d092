"""TokenSelectRuntime: runs one model graph as token-selection variants (one per bucket).

The pass (``passes/token_select.py``) builds the variant computing k image tokens; this runtime
owns the state they share (X_ref, Y_ref, the trajectory counter: one set per (request, CFG
context), ``runtime.requests``, kept across variant switches) and picks the variant of the next step from the motion count m the
graph returns: the smallest bucket >= m. Reading (step, m) is the one host sync per step.
Variants are compiled lazily, the first time their bucket is picked (at most one compile per
bucket). The first ``max(1, warmup_steps)`` steps of a trajectory run the 100 % variant; when a
new trajectory starts while a smaller variant was picked (the graph detects it from the
timestep), the step is run again with the 100 % variant.

``static_approx`` "linear" / "cached_linear" need the block-stack map (W [D, D], b [D]) of the
calibration file (``calibration.calibrate_stack``); it is loaded once here and passed to
every variant with k < N as two constant inputs. Without a calibration, with
``calibration="online"`` or with a file that holds no stack map, a warning is issued and the
static tokens get "cached".

Each variant is a ``GraphRuntime`` with its own block-cache state, registered in a private
``ModelEntry``: switching variants drops the block-cache state of the variant switched to
(its anchors may belong to another token set), so an anchor is never stale.
"""

from __future__ import annotations

import collections
import logging
import threading
import warnings
from dataclasses import dataclass

import torch

from ..passes.token_select import apply_token_select, bucket_sizes, image_tokens
from .context import current_context
from .records import TraceLog
from . import registry
from .registry import ModelEntry
from .requests import current_request, end_finished

log = logging.getLogger("fastcache_fx")

#: the state every variant shares (x_ref, y_ref, step, prev_t, t_first: ``passes.token_select``'s
#: layout); after it in the outputs the motion count m, then the selected indices for k < N
SHARED = 5


class _VariantEntry(ModelEntry):
    """The variants' entry: its own ``note_call`` (variant switches), the model's ``replay``."""

    def __init__(self, parent: ModelEntry) -> None:
        self.parent = parent
        super().__init__()

    @property
    def replay(self):
        return self.parent.replay

    @replay.setter
    def replay(self, value) -> None:  # ModelEntry.__init__ sets it; the parent's is used
        pass


@dataclass
class SelectRecord:
    """One step: context, step in the trajectory, tokens computed k of N, motion count m."""

    context: str
    step: int
    k: int
    n: int
    m: int


class TokenSelectRuntime:
    """The callable the backend hands to Dynamo when ``enable_spatial_approx`` is on.

    Args:
        backend_factory: ``f(gm, example_inputs, select)`` -> GraphRuntime (the backend's block
            cache + lowering for one variant graph).
        gm: the Dynamo graph (never modified). config: the FastCacheConfig. regions: its blocks.
        n: image tokens N. clone_outputs: copy state a CUDA-graph replay would overwrite.
        static_approx: the approximation built ("cached", or "linear" / "cached_linear" with
            ``stack`` = (W [D, D], b [D]) float32 on the device).
    """

    kind = "token_select"
    fallback = None
    dynamic = False

    def __init__(self, backend_factory, gm, config, regions, n: int, clone_outputs: bool = False,
                 static_approx: str = "cached", stack: tuple | None = None) -> None:
        self.calls = 0
        self.factory = backend_factory
        self.gm = gm
        self.config = config
        self.regions = regions
        self.n = n
        self.buckets = bucket_sizes(n, config.token_buckets)
        self.min_step = max(1, config.warmup_steps)
        self.clone_outputs = clone_outputs
        self.variants: dict[int, object] = {}
        self.results: dict[int, object] = {}
        self.entry: ModelEntry | None = None
        self.sub: _VariantEntry | None = None
        self.trace = TraceLog(config.trace_steps, config.trace_requests)
        self.select_trace: collections.deque[SelectRecord] = collections.deque(maxlen=config.trace_steps)
        self.states: dict[tuple[str, str], dict] = {}  # (request id, context) -> shared state
        self.layout = None
        self.token_merge = None
        self.online = None
        self.static_approx = static_approx
        self.stack = list(stack) if stack is not None else []
        self._build_lock = threading.Lock()

    # variants ----------------------------------------------------------------------------
    @property
    def compiled_variants(self) -> int:
        """How many variants were compiled (at most one per bucket)."""
        return len(self.variants)

    def variant(self, k: int, args, state: list[torch.Tensor]):
        """The GraphRuntime computing k tokens, compiled on first use."""
        rt = self.variants.get(k)
        if rt is not None:
            return rt
        with self._build_lock:  # concurrent requests picking one new bucket compile it once
            rt = self.variants.get(k)
            return rt if rt is not None else self._build(k, args, state)

    def _build(self, k: int, args, state: list[torch.Tensor]):
        gm_k, res = apply_token_select(self.gm, self.config, k, self.regions, static_approx=self.static_approx)
        if not res.applied:  # checked at build time for the smallest bucket; should not happen
            raise RuntimeError(f"fastcache: token selection with k={k} failed: {res.reason}")
        rt = self.factory(gm_k, list(args) + list(state) + self._weights(res), res)
        if self.entry is None:  # the first variant: join the model's entry as one graph
            self.entry = rt.entry
            self.sub = _VariantEntry(self.entry)
            self.entry.graphs.append(self)
            self.layout = rt.layout
        if rt in rt.entry.graphs:
            rt.entry.graphs.remove(rt)
        rt.entry = self.sub
        self.sub.graphs.append(rt)
        rt.trace = self.trace  # one chronological block-decision trace for stats()
        self.variants[k] = rt
        self.results[k] = res
        log.info("fastcache: token selection variant k=%d of N=%d compiled (%d so far)", k, self.n, len(self.variants))
        return rt

    def _weights(self, res) -> list[torch.Tensor]:
        """The stack-map inputs of a variant (``res.weights``: weight, bias), or []."""
        return self.stack[:len(res.weights)] if res.weights else []

    # state -------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[str]:
        return self.layout.blocks if self.layout is not None else []

    def drop_state(self) -> None:
        """Forget every context's state: the next step runs every token."""
        self.states.clear()
        if self.sub is not None:
            self.sub.drop_state()

    def state_of(self, context: str = "default", request: str | None = None) -> dict:
        """The shared state dict of ``context`` in ``request`` (None: the request that ran it last);
        KeyError when there is none (``runtime.state.state_of``)."""
        from .state import state_of

        return state_of(self.states, context, request)

    def drop_request(self, request: str, context: str | None = None) -> None:
        """Forget the state of ``request`` (an id): of its ``context``, or of all its contexts."""
        for k in [k for k in list(self.states) if k[0] == request and (context is None or k[1] == context)]:
            self.states.pop(k, None)
        if self.sub is not None:
            for g in self.sub.graphs:
                g.drop_request(request, context)

    def reset(self) -> None:
        """``drop_state`` and forget the statistics."""
        self.drop_state()
        self.trace.clear()
        self.select_trace.clear()
        self.calls = 0
        if self.sub is not None:
            self.sub.reset()

    def state_bytes(self, request: str | None = None) -> dict[str, int]:
        """Bytes of live state (of one request id if given): the variants' block caches and the
        shared X_ref / Y_ref (``""``)."""
        out: dict[str, int] = {}
        for g in (self.sub.graphs if self.sub is not None else []):
            for b, n in g.state_bytes(request).items():
                out[b] = out.get(b, 0) + n
        for (rid, _), st in list(self.states.items()):
            if request is not None and rid != request:
                continue
            out[""] = out.get("", 0) + sum(t.numel() * t.element_size() for t in st["shared"])
        return out

    def _state_for(self, ctx: tuple[str, str], specs) -> dict:
        st = self.states.get(ctx)
        if st is None:
            dev = self._device
            st = self.states[ctx] = {
                "shared": [torch.full(s.shape, s.fill, dtype=s.dtype, device=dev) for s in specs[:SHARED]],
                "idx": {}, "next_k": self.n}
        return st

    def _bucket(self, m: int) -> int:
        return next((b for b in self.buckets if b >= m), self.n)

    # call --------------------------------------------------------------------------------
    def __call__(self, *args):
        registry.count_cached_call()
        end_finished()
        req, ctx = current_request(), current_context()
        live = self.entry.requests
        with live.lock:
            live.admit(req, ctx)
            if self.entry.note_call(self, (), req.id):
                self.drop_request(req.id)
            st = self._state_for((req.id, ctx), self.results[self.n].state)
        k = st["next_k"]
        outs, new, step, m = self._run(k, args, st)
        if k < self.n and step < self.min_step:  # a new trajectory began: every token runs
            self.trace.pop(req.id)  # the discarded call's block decisions
            k = self.n
            outs, new, step, m = self._run(k, args, st)
        st["shared"] = new[:SHARED]
        if k < self.n:
            st["idx"][k] = new[SHARED + 1]
        st["next_k"] = self.n if step + 1 < self.min_step else self._bucket(m)
        with live.lock:
            self.select_trace.append(SelectRecord(ctx, step, k, self.n, m))
            self.calls += 1
        res = self.results[k]
        return tuple(outs) if res.output_is_tuple else outs[0]

    def _run(self, k: int, args, st):
        extra = list(st["shared"])
        if k < self.n:
            idx_prev = st["idx"].get(k)
            if idx_prev is None:
                idx_prev = torch.full((k,), -1, dtype=torch.int64, device=self._device)
            extra.append(idx_prev)
        rt = self.variant(k, args, extra)
        res = self.results[k]
        out = rt(*args, *extra, *self._weights(res))
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        nu = res.num_user_outputs
        user, new = out[:nu], out[nu:]
        if self.clone_outputs:
            new = [t.clone() for t in new]
        step, m = torch.stack([new[2], new[SHARED]]).tolist()  # the one host sync of the step
        return user, new, int(step), int(m)

    # stats -------------------------------------------------------------------------------
    def summary(self) -> dict:
        """``{"buckets", "variants_compiled", "spatial_approx_ratio", "steps": [{context, step,
        k, n, m}]}``: ratio = approximated token-steps / token-steps."""
        recs = list(self.select_trace)
        total = sum(r.n for r in recs)
        approx = sum(r.n - r.k for r in recs)
        return {"buckets": list(self.buckets), "variants_compiled": self.compiled_variants,
                "static_approx": self.static_approx,
                "spatial_approx_ratio": approx / total if total else 0.0,
                "steps": [{"context": r.context, "step": r.step, "k": r.k, "n": r.n, "m": r.m} for r in recs]}


def build_token_select(backend_factory, gm, example_inputs, config, regions, device, clone_outputs=False):
    """A TokenSelectRuntime for ``gm`` (block ``regions`` from ``find_blocks``) with its 100 %
    variant compiled, or None (with one warning) when the graph does not fit token selection
    (compile it without then). ``backend_factory(gm, example_inputs, select)`` builds one variant
    (``backend.build_variant``)."""
    n = image_tokens(regions)
    if isinstance(n, str):
        warnings.warn(f"fastcache: token selection left alone: {n}; compiled without it", stacklevel=3)
        return None
    static_approx, stack = _stack_map(config, regions, device)
    _, probe = apply_token_select(gm, config, bucket_sizes(n, config.token_buckets)[0], regions,
                                  static_approx=static_approx)
    if not probe.applied:  # a block bakes N: the smallest variant does not propagate
        warnings.warn(f"fastcache: token selection left alone: {probe.reason}; compiled without it", stacklevel=3)
        return None
    rt = TokenSelectRuntime(backend_factory, gm, config, regions, n, clone_outputs, static_approx, stack)
    rt._device = device
    _, full = apply_token_select(gm, config, n, regions)
    state = [torch.full(s.shape, s.fill, dtype=s.dtype, device=device) for s in full.state]
    rt.variant(n, example_inputs, state)
    return rt


def _stack_map(config, regions, device) -> tuple[str, tuple | None]:
    """(static_approx to build, (W, b) on ``device`` or None): ``config.static_approx`` with the
    calibration's stack map, or "cached" with a warning when there is none.

    Raises:
        FileNotFoundError, ValueError: from ``load_stack_map`` (a stack map for the other
            static_approx, another model or width).
    """
    want = config.static_approx
    if want == "cached":
        return "cached", None
    why = None
    if config.calibration is None:
        why = "no calibration is given (calibration=path of a file from calibrate_stack)"
    elif config.calibration == "online":
        why = "calibration='online' fits block maps only"
    else:
        from ..passes.blocks import tensor_meta
        from ..passes.token_select import _image_stream
        from ..calibration import load_stack_map

        si, _ = _image_stream(regions)  # image_tokens() succeeded: unambiguous
        width = tensor_meta(regions[0].stream_inputs[si])[0][-1]
        pair = load_stack_map(config.calibration, want, int(width))
        if pair is not None:
            return want, tuple(t.to(device) for t in pair)
        why = f"{config.calibration} holds no stack map (fastcache_fx.calibration.calibrate_stack)"
    warnings.warn(f"fastcache: static_approx={want!r} needs the block-stack map of a calibration, but {why}; "
                  "falling back to static_approx='cached'", stacklevel=4)
    return "cached", None
