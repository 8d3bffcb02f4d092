"""Requests: which trajectory a transformer call belongs to (docs/serving.md).

A server runs many generations at once on one shared, compiled transformer (diffusers'
examples/server: ``Pipeline.from_pipe(shared)`` + ``loop.run_in_executor``; examples/server-async:
``RequestScopedPipeline``). The CFG context names those pipelines set ("cond", "uncond") are the
same for every request, so they cannot tell requests apart. Every call therefore also belongs to a
**request**, and cache state is kept per (request, CFG context):

1. an explicit ``with fastcache_fx.request():`` scope (a ``ContextVar``: it follows the code into
   ``asyncio`` tasks and ``asyncio.to_thread``, which copy the context), else
2. the running ``asyncio`` task (coroutines that step a transformer in turns in one thread), else
3. the thread (``threading.local``): a request thread, or a pool thread of ``run_in_executor``,
   which copies no context.

A request ends, and its cache state is freed in every model it used, when its scope closes, when a
diffusers pipeline call ends (``end_current_request``, called from the pipeline's
``maybe_free_model_hooks``: ``api.enable_fastcache`` arranges it), or when its thread or task ends
(queued here, freed at the next call of any model or at ``stats()``: ``end_finished``). The next
call of that thread or task then starts a new request. ``runtime.live`` bounds what a model keeps
for requests that never end (a bare compiled transformer in long-lived threads).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import weakref
from contextvars import ContextVar

_IDS = itertools.count(1)
_EXPLICIT: ContextVar["Request | None"] = ContextVar("fastcache_fx_request", default=None)
_LOCAL = threading.local()
_TASKS: "weakref.WeakKeyDictionary[asyncio.Task, Request]" = weakref.WeakKeyDictionary()
# requests whose thread or task ended; collected objects must not take locks, so they only queue
_ENDED: collections.deque = collections.deque()


class Request:
    """One request: an id and the models (``ModelEntry``) holding state for it.

    Args:
        name: a prefix for the id (``f"{name}-{n}"``, n unique in the process); default "request".
    """

    __slots__ = ("id", "_entries", "__weakref__")

    def __init__(self, name: str | None = None) -> None:
        self.id = f"{name or 'request'}-{next(_IDS)}"
        self._entries: weakref.WeakSet = weakref.WeakSet()

    def hold(self, entry) -> None:
        """``entry`` keeps state for this request (it is told when the request ends)."""
        self._entries.add(entry)

    def end(self) -> None:
        """Free this request's cache state in every model; its statistics stay. Idempotent."""
        entries = list(self._entries)
        self._entries = weakref.WeakSet()
        for e in entries:
            e.end_request(self.id)

    def __repr__(self) -> str:
        return f"Request({self.id!r})"


class _Slot:
    """A thread's implicit request; queued for ending when the thread's locals are collected."""

    def __init__(self) -> None:
        self.request = Request("thread")
        self.finalizer = weakref.finalize(self, _ENDED.append, self.request)


@contextlib.contextmanager
def request(name: str | None = None):
    """Run transformer calls as one request: its own cache state, freed when the block ends.

        with fastcache_fx.request():
            images = pipe(prompt_embeds=...).images

    Not needed for pipelines compiled with ``enable_fastcache`` or for one request per thread
    (each thread and asyncio task is a request of its own); useful where one thread serves many
    requests in turns, or a request's work moves between threads (``asyncio.to_thread`` copies
    the scope). Scopes nest (the inner one is a request of its own).

    Yields:
        the ``Request`` (``.id`` names it in ``stats()["requests"]``).

    Raises:
        ValueError: ``name`` is given and not a non-empty string.
    """
    if name is not None and (not isinstance(name, str) or not name):
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    r = Request(name)
    token = _EXPLICIT.set(r)
    try:
        yield r
    finally:
        _EXPLICIT.reset(token)
        r.end()


def _running_task():
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop in this thread
        return None


def current_request() -> Request:
    """The request of the running code: the innermost ``request()`` scope, else the asyncio
    task's, else the thread's (created on first use)."""
    r = _EXPLICIT.get()
    if r is not None:
        return r
    task = _running_task()
    if task is not None:
        r = _TASKS.get(task)
        if r is None:
            r = _TASKS[task] = Request("task")
            task.add_done_callback(lambda _t, r=r: _ENDED.append(r))
        return r
    slot = getattr(_LOCAL, "slot", None)
    if slot is None:
        slot = _LOCAL.slot = _Slot()
    return slot.request


def end_current_request() -> None:
    """End the running code's request (a pipeline call is over): free its state everywhere. The
    thread's or task's next call starts a new request; an explicit scope keeps its id."""
    r = _EXPLICIT.get()
    if r is None:
        task = _running_task()
        if task is not None:
            r = _TASKS.pop(task, None)
        else:
            slot = getattr(_LOCAL, "slot", None)
            if slot is not None:
                slot.finalizer.detach()
                _LOCAL.slot = None
                r = slot.request
    if r is not None:
        r.end()


def end_finished() -> None:
    """End the requests whose thread or task has ended since the last call (cheap when none).
    Call it holding no model's lock."""
    while _ENDED:
        try:
            r = _ENDED.popleft()
        except IndexError:  # another thread took the last one
            return
        r.end()
