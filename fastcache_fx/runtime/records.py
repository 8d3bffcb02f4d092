"""The per-step decision record every runtime keeps for ``stats()``, and the bounded log of them."""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One step of one context: tensors as the graph returned them (read lazily by stats())."""

    context: str
    step: torch.Tensor
    delta: torch.Tensor
    threshold: torch.Tensor
    approx: torch.Tensor
    seq: int = field(default_factory=lambda: next(_SEQ))  # call order across the model's graphs
    output_error: torch.Tensor | None = None  # decision="output": the step's predicted output error
    request: str = ""  # the request id (runtime.requests)
    evicted: bool = False  # the step started afresh: the bound on live requests had dropped its state


_SEQ = itertools.count()


class TraceLog:
    """The step records ``stats()`` reads, bounded: the last ``steps`` records of each of the last
    ``requests`` requests (by their latest record), and ``steps`` records in all (the oldest
    request's records go first). Iterates in call order.

    Args:
        steps: ``FastCacheConfig.trace_steps``. requests: ``FastCacheConfig.trace_requests``.
    """

    def __init__(self, steps: int, requests: int = 64) -> None:
        self.steps, self.requests = int(steps), int(requests)
        self._by: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._n = 0
        self._lock = threading.Lock()

    def append(self, rec: StepRecord) -> None:
        with self._lock:
            q = self._by.get(rec.request)
            if q is None:
                q = self._by[rec.request] = collections.deque(maxlen=self.steps)
                while len(self._by) > self.requests:
                    self._n -= len(self._by.popitem(last=False)[1])
            else:
                self._by.move_to_end(rec.request)
            self._n += len(q) < self.steps  # a full deque drops its oldest
            q.append(rec)
            while self._n > self.steps:
                first = next(iter(self._by))
                self._by[first].popleft()
                self._n -= 1
                if not self._by[first]:
                    del self._by[first]

    def pop(self, request: str) -> None:
        """Forget the last record of ``request`` (a call that was run again)."""
        with self._lock:
            q = self._by.get(request)
            if q:
                q.pop()
                self._n -= 1

    def clear(self) -> None:
        with self._lock:
            self._by.clear()
            self._n = 0

    def _all(self) -> list[StepRecord]:
        with self._lock:
            recs = [r for q in self._by.values() for r in q]
        return sorted(recs, key=lambda r: r.seq)

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self._all()[i]
