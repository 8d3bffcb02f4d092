"""Calls of a model that no compiled graph served: Dynamo ran the model's code eagerly.

Dynamo runs a frame uncompiled when the code object reached its recompile limit (8 cache
entries per code object by default; diffusers' hook and LoRA-scale wrappers are code objects
shared by every model, so a process holding many models reaches it) or after a compile error it
suppressed. The backend is never called then, so ``stats()`` would report zeros; ``watch_calls``
wraps a compiled module's forward, counts the calls in which none of the model's graphs ran and
keeps Dynamo's own message as the reason.
"""

from __future__ import annotations

import functools
import logging

import torch

from .. import torch_compat
from .registry import ModelEntry

_DYNAMO_LOGGER = torch_compat.DYNAMO_RECOMPILE_LOGGER


class _Catch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "recompile_limit" in msg or "cache_size_limit" in msg:
            self.messages.append(" ".join(msg.split()[:12]))


def _graph_calls(entry: ModelEntry) -> int:
    # a model split by graph breaks: its block graphs must run; glue alone is not the model
    with_blocks = [g for g in entry.graphs if g.blocks]
    return sum(g.calls for g in (with_blocks or entry.graphs))


def unskip(module: torch.nn.Module) -> None:
    """Let Dynamo trace ``type(module).forward`` again.

    Why: Dynamo marks a code object to run eagerly for good when one trace of it fails inside a
    loop (e.g. a model of the same class with diffusers' cache hooks, whose ``inspect.signature``
    call Dynamo cannot trace): every later model of that class would run its forward uncompiled
    and hand the backend only the fragments of its submodules. Compiled entries are kept."""
    code = getattr(type(module).forward, "__code__", None)
    if code is not None:
        torch_compat.reset_frame_strategy(code)


def watch_calls(forward, entry: ModelEntry, module: torch.nn.Module):
    """``forward`` (the compiled ``module``'s) wrapped: a call in which no graph of ``entry``
    ran counts in ``entry.uncompiled_calls``, with ``entry.uncompiled_reason`` (Dynamo's
    recompile-limit message when it gave one during the call, else a generic reason); the next
    call tries to compile again (``unskip``: the forward may have been marked to run eagerly by
    another model of the class)."""

    @functools.wraps(forward)
    def watched(*args, **kwargs):
        before = _graph_calls(entry)
        catch = _Catch()
        logger = logging.getLogger(_DYNAMO_LOGGER)
        logger.addHandler(catch)
        try:
            out = forward(*args, **kwargs)
        finally:
            logger.removeHandler(catch)
        if _graph_calls(entry) == before:
            entry.uncompiled_calls += 1
            if catch.messages:
                entry.uncompiled_reason = catch.messages[0]
            elif entry.uncompiled_reason is None:
                entry.uncompiled_reason = ("Dynamo ran the model without a compiled graph (a recompile limit reached "
                                           "earlier, a forward marked to run eagerly after a failed trace, or a "
                                           "suppressed compile error; TORCH_LOGS=recompiles,graph_breaks tells)")
            unskip(module)
        return out

    return watched
