"""GraphRuntime: calls one rewritten, compiled graph and owns its cache state between calls.

State is a list of tensors laid out by ``BlockCacheResult.state``; there is one list per CFG
context, created lazily (diffusers StateManager style) and dropped on ``reset()`` or when the
model last ran through another graph (a change of shape, dtype, device or batch size).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from ..passes.block_cache import AccumSpec, BlockCacheResult, ControlSpec, StateSpec
from .context import current_context
from .registry import ModelEntry


@dataclass
class StepRecord:
    """One step of one context: tensors as the graph returned them (read lazily by stats())."""

    context: str
    step: torch.Tensor
    delta: torch.Tensor
    threshold: torch.Tensor
    approx: torch.Tensor


class GraphRuntime:
    """The callable the backend hands to Dynamo for one graph.

    Args:
        entry: the model's registry entry (shared by all graphs of the model).
        layout: what the block-cache pass did (input/output layout, block names).
        compiled: the lowered graph (Inductor), called with user inputs + extra inputs.
        weights: tensors for the ``WeightSpec`` inputs (calibrated maps), in layout order.
        device: where state tensors live.
        clone_outputs: copy outputs that a CUDA-graph replay would overwrite.
    """

    def __init__(self, entry: ModelEntry, layout: BlockCacheResult, compiled, weights: dict[str, torch.Tensor],
                 device: torch.device, trace_steps: int, clone_outputs: bool = False) -> None:
        self.entry = entry
        self.layout = layout
        self.compiled = compiled
        self.weights = weights
        self.device = device
        self.clone_outputs = clone_outputs
        self.states: dict[str, list[torch.Tensor]] = {}
        self.trace: collections.deque[StepRecord] = collections.deque(maxlen=trace_steps)
        self.calls = 0
        # -1 everywhere: every block decides live (ControlSpec "force")
        self.live = {c.name: torch.full(c.shape, int(c.fill), dtype=c.dtype, device=device) for c in layout.controls}
        self.online = None  # runtime.online.OnlineCalibration with calibration="online" (AccumSpec inputs)
        entry.graphs.append(self)

    # state -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every context's cache state (the next step of each context is computed fully)."""
        self.states.clear()

    def _state_for(self, ctx: str) -> list[torch.Tensor]:
        st = self.states.get(ctx)
        if st is None:  # static graph: StateSpec shapes are ints
            st = self.states[ctx] = [torch.full(s.shape, s.fill, dtype=s.dtype, device=self.device)
                                     for s in self.layout.state]
        return st

    # call --------------------------------------------------------------------------------
    def __call__(self, *args):
        if self.entry.note_call(self):
            self.reset()
        ctx = current_context()
        state = self._state_for(ctx)
        controls = dict(self.live)
        if self.entry.replay is not None and "force" in controls:
            row = self.entry.replay.next_row(len(self.layout.blocks))
            if row is not None:
                controls["force"] = row.to(self.device)
        extra = []
        si = 0
        for spec in self.layout.extra_inputs:
            if isinstance(spec, StateSpec):
                extra.append(state[si])
                si += 1
            elif isinstance(spec, ControlSpec):
                extra.append(controls[spec.name])
            elif isinstance(spec, AccumSpec):
                extra.append(self.online.accum[spec.name])
            else:
                extra.append(self.weights[spec.name])
        full = list(args) + extra
        outs = self.compiled(*full)  # Dynamo's convention for backend results: positional args
        nu, ns = self.layout.num_user_outputs, len(self.layout.state)
        new_state = list(outs[nu:nu + ns])
        delta, thr, ok = outs[nu + ns:nu + ns + 3]
        if self.clone_outputs:
            new_state = [t.clone() for t in new_state]
            delta, thr, ok = delta.clone(), thr.clone(), ok.clone()
        self.states[ctx] = new_state
        self.trace.append(StepRecord(ctx, new_state[0], delta, thr, ok))
        if self.online is not None:  # new accumulators come last; may refit and swap self.weights
            na = len(self.layout.accums)
            self.online.after_step(list(outs[len(outs) - na:]), self.weights, clone=self.clone_outputs)
        self.calls += 1
        user = outs[:nu]
        return tuple(user) if self.layout.output_is_tuple else user[0]
