"""Replay of a recorded decision trace: force each block's branch, step by step.

Benchmarks compare approximation kinds (or models with random weights, whose live decisions
mean nothing) at the *same* set of approximated (block, step) pairs: record the trace once
(``stats(model)["trace"]``), then replay it. The rewritten graph has a ``force`` control input
(int8 [L]: -1 decide live, 0 full, 1 approximate, see ``ops.decision.block_decision``);
while a replay is active every call of a compiled graph of the model consumes one row.
"""

from __future__ import annotations

import contextlib

import torch

from . import registry


class DecisionReplay:
    """Rows of forced decisions, consumed one per compiled-graph call.

    Args:
        approx: [steps, L_trace] bool-like (tensor, array or nested lists): True approximates
            block l at that call. A model with L blocks uses column floor(l * L_trace / L) for
            block l, so a trace recorded on a 6-block model can drive a 28-block one.
        then: what calls after the last row do: "live" (decide live again) or "full".

    Raises:
        ValueError: ``approx`` is not 2-D with at least one row and column, or ``then`` unknown.
    """

    def __init__(self, approx, then: str = "live") -> None:
        a = torch.as_tensor(approx).to(torch.bool)
        if a.dim() != 2 or a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"approx: expected a [steps, blocks] array with steps, blocks >= 1, got shape {tuple(a.shape)}")
        if then not in ("live", "full"):
            raise ValueError(f"then: expected 'live' or 'full', got {then!r}")
        self.approx = a
        self.then = then
        self.used = 0

    def next_row(self, num_blocks: int) -> torch.Tensor | None:
        """The int8 [num_blocks] force row of the next call (None: decide live)."""
        if self.used >= self.approx.shape[0]:
            return None if self.then == "live" else torch.zeros(num_blocks, dtype=torch.int8)
        row = self.approx[self.used]
        self.used += 1
        cols = (torch.arange(num_blocks) * row.numel()) // num_blocks
        return row[cols].to(torch.int8)


@contextlib.contextmanager
def replay_decisions(model, approx, then: str = "live"):
    """Force the decisions of ``model``'s fastcache graphs from a trace inside the ``with`` block.

        trace = [s["approx"] for s in fastcache_fx.stats(model)["trace"][-50:]]
        fastcache_fx.reset(model)
        with fastcache_fx.replay_decisions(model, trace) as replay:
            run_trajectory()          # call i uses row i
        assert replay.used == 50

    A forced approximation still needs an anchor (a block never computed in this trajectory, or
    whose input is not finite, is computed fully), and forced steps update the cache state as
    live ones do. Works before the first compile too (the model is registered by its parameters).

    Args:
        model: module, compiled module or pipeline (``.transformer``).
        approx, then: see ``DecisionReplay``.

    Yields:
        the DecisionReplay (``.used``: rows consumed so far).

    Raises:
        ValueError: a bad ``approx`` / ``then``; TypeError: not a model.
    """
    module = registry.unwrap(model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model: expected an nn.Module or a pipeline with .transformer, got {type(model).__name__}")
    replay = DecisionReplay(approx, then)
    entry = registry.entry_for_params(module.parameters())
    previous, entry.replay = entry.replay, replay
    try:
        yield replay
    finally:
        entry.replay = previous
