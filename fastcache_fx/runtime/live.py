"""LiveRequests: which requests hold cache state in one model, and the bound on them.

Every runtime of a model (``ModelEntry.graphs``) keeps its state per key (request id, CFG
context) (``runtime.requests``). This object, one per model, is the one place that admits a key,
keeps the least-recently-used order, and drops state:

- at most ``max_live`` requests hold state (``FastCacheConfig.max_live_requests``), each with at
  most ``max_live`` contexts; admitting one more drops the least recently used (in every graph of
  the model). A dropped key's next step starts a trajectory (computed fully) and its trace record
  says ``evicted``.
- ``end(request id)``: a finished request's state is freed; the bytes it held are remembered for
  ``stats()`` (the last ``keep`` requests).
- which graph computed each block last, per request (``note_call``): a change of shape, dtype or
  graph in one request drops that request's state only.

All of it under one re-entrant lock (``lock``), which the runtimes also take around their own
bookkeeping; the compiled graphs run outside it.
"""

from __future__ import annotations

import collections
import threading

#: how many dropped keys are remembered so that their next step's record can say ``evicted``
_EVICTED_MEMORY = 1024


class LiveRequests:
    """The live requests of one model (``entry``: its ``ModelEntry``; see the module docstring)."""

    def __init__(self, entry) -> None:
        self.entry = entry
        self.lock = threading.RLock()
        self.max_live = 8
        self.keep = 64
        self.live: collections.OrderedDict[str, collections.OrderedDict[str, None]] = collections.OrderedDict()
        self.last_run: dict[str, dict[str, tuple]] = {}  # request id -> {block: (graph, shape key)}
        self.evicted: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.ended: collections.OrderedDict[str, int] = collections.OrderedDict()  # id -> state bytes at its end
        self.evictions = 0
        self.previous: tuple | None = None  # set by note_call

    def configure(self, max_live: int, keep: int) -> None:
        """The bounds (``FastCacheConfig.max_live_requests``, ``trace_requests``)."""
        with self.lock:
            self.max_live, self.keep = int(max_live), int(keep)

    def admit(self, req, ctx: str) -> bool:
        """Key (``req.id``, ``ctx``) is about to run a step: mark it most recently used, dropping
        the least recently used requests / contexts beyond ``max_live``. True when this key's state
        was dropped by the bound before (its step starts afresh: the trace says ``evicted``)."""
        with self.lock:
            rid = req.id
            ctxs = self.live.get(rid)
            if ctxs is None:
                ctxs = self.live[rid] = collections.OrderedDict()
                req.hold(self.entry)
                while len(self.live) > self.max_live:
                    old = next(iter(self.live))
                    self._evict(old, tuple(self.live[old]))
            else:
                self.live.move_to_end(rid)
            if ctx in ctxs:
                ctxs.move_to_end(ctx)
            else:
                ctxs[ctx] = None
                while len(ctxs) > self.max_live:
                    self._evict(rid, (next(iter(ctxs)),))
            if (rid, ctx) in self.evicted:
                del self.evicted[(rid, ctx)]
                return True
            return False

    def _evict(self, rid: str, ctxs: tuple) -> None:
        for ctx in ctxs:
            self.evicted[(rid, ctx)] = None
            if len(self.evicted) > _EVICTED_MEMORY:
                self.evicted.popitem(last=False)
        self.evictions += len(ctxs)
        for g in self.entry.graphs:
            for ctx in ctxs:
                g.drop_request(rid, ctx)
        left = self.live.get(rid)
        if left is not None:
            for ctx in ctxs:
                left.pop(ctx, None)
            if not left:
                del self.live[rid]
                self.last_run.pop(rid, None)

    def note_call(self, graph, key: tuple, rid: str) -> bool:
        """``graph`` computes its blocks now for request ``rid`` at shape ``key``; True when another
        graph, or this graph at another shape, computed one of them last in this request: the
        caller must drop the request's state. Graphs with disjoint blocks never invalidate each
        other. ``self.previous`` is then the (graph, key) it replaces, if one graph computed them
        all."""
        with self.lock:
            runs = self.last_run.setdefault(rid, {})
            me = (graph, key)
            changed = False
            lasts = [runs.get(b) for b in graph.blocks]
            for b, last in zip(graph.blocks, lasts):
                changed |= last is not None and (last[0] is not graph or last[1] != key)
                runs[b] = me
            # the one (graph, key) that computed all of those blocks last: whose state the caller
            # may take over (``GraphRuntime._take_over``); None when several, or a block is new
            same = lasts and all(x is not None and x[0] is lasts[0][0] and x[1] == lasts[0][1] for x in lasts)
            self.previous = lasts[0] if changed and same else None
            return changed

    def end(self, rid: str) -> None:
        """Request ``rid`` is over: free its state in every graph (its bytes are remembered)."""
        with self.lock:
            if rid not in self.live:
                return
            held = sum(sum(g.state_bytes(rid).values()) for g in self.entry.graphs)
            self.ended[rid] = held
            while len(self.ended) > self.keep:
                self.ended.popitem(last=False)
            for g in self.entry.graphs:
                g.drop_request(rid)
            del self.live[rid]
            self.last_run.pop(rid, None)

    def clear(self) -> None:
        """Forget every request (the graphs' states are dropped by the caller)."""
        with self.lock:
            self.live.clear()
            self.last_run.clear()
            self.evicted.clear()
