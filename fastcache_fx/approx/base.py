"""The base of an approximation kind: what an approximated block returns instead of computing.

An approximation kind is one object (a subclass of ``Approximation``, one module each, listed
in ``approx.KINDS``) that the block-cache pass, the regional runtime, export and ``explain`` all
ask the same questions:

- ``resolve(config)``: the kind actually built (a calibrated kind without a calibration file
  falls back to residual reuse, with one warning);
- ``add_inputs(io, block, metas, config)``: its per-block state and weight inputs
  (``contract.TensorSpec``), returned as handles (graph nodes) for the calls below;
- ``take_operands(handles, take)``: which of them the block's cond branches read (``Slots.kind``);
- ``node(g, ph, slots, s, config)``: the graph node computing the approximated output of stream
  ``s`` inside a branch (a call of an ``ops`` function);
- ``full_extras`` / ``approx_extras``: extra outputs of the two branches (the same count);
- ``update(...)``: its new state after the block's cond (at a full computation);
- ``weights(config, regions)``: its weight source; ``stream_tensors(config)``: its memory cost.

See docs/architecture.md, "Adding an approximation kind".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx


@dataclass
class Slots:
    """Positions of a block's operands in its cond's operand list (per stream where a list).

    ``stream``: the stream inputs H; ``res``: the anchor residuals R_anchor; ``anchor_in``: the
    anchor inputs H_anchor; ``t``: this step's timestep [] (when a kind reads it); ``kind``:
    what the approximation kind took (``Approximation.take_operands``)."""

    stream: list[int]
    res: list[int]
    anchor_in: list[int]
    t: int | None = None
    kind: dict = field(default_factory=dict)


def meta(shape=(), dtype=torch.float32) -> torch.Tensor:
    """A meta tensor: the example value of a node or input a pass creates."""
    return torch.empty(shape, dtype=dtype, device="meta")


class Approximation:
    """One approximation kind (see the module docstring); the base is a no-op for every hook."""

    name = ""
    #: takes calibrated maps (weight inputs from a calibration file or online statistics)
    calibrated = False
    #: the cond branches read this step's timestep t
    reads_t = False

    def needs_t(self, config, layout) -> bool:
        """The cond branches read this step's timestep t (``Slots.t``)."""
        return self.reads_t

    def resolve(self, config) -> "Approximation":
        """The kind the graph is built with for ``config`` (``self`` unless it cannot run)."""
        return self

    def weights(self, config, regions) -> dict[str, torch.Tensor]:
        """{weight input name: tensor} for ``regions`` (``passes.blocks.BlockRegion``); {} when
        the kind has no weights or they come at run time."""
        return {}

    def add_inputs(self, io, block: str, metas: list, config) -> dict:
        """Add this kind's per-block state (``io.state``) and weights (``io.weight``) of block
        ``block`` with stream metas [(shape, dtype)]; returns handles for the later hooks."""
        return {}

    def add_weights(self, io, block: str, metas: list, config, layout) -> dict:
        """Add this kind's weight inputs (after the decision rule's state); handles."""
        return {}

    def take_operands(self, handles: dict, take) -> dict:
        """``take(nodes)`` appends operands and returns their positions; returns ``Slots.kind``."""
        return {}

    def decision_kwargs(self, cur, handles: dict) -> dict:
        """Extra keyword arguments of ``ops.decision.block_decision`` (inserted with ``cur``)."""
        return {}

    def node(self, g: fx.Graph, ph: list[fx.Node], slots: Slots, s: int, config) -> fx.Node:
        """The approximated output of stream ``s`` from the branch placeholders ``ph``."""
        raise NotImplementedError

    def full_extras(self, g: fx.Graph, ph: list[fx.Node], slots: Slots, ys: list[fx.Node]) -> list[fx.Node]:
        """Extra outputs of the full branch (``ys``: the block's true outputs)."""
        return []

    def approx_extras(self, g: fx.Graph, ph: list[fx.Node], slots: Slots, n: int) -> list[fx.Node]:
        """What the approximation branch returns in place of ``full_extras``."""
        return []

    def update(self, cur, handles: dict, ok, streams, outs, anchor_res, step, t, extras, config) -> list:
        """[(input placeholder, its new value)] for the state and accumulator inputs this kind
        added, after the block's cond; ``extras``: (the cond node, index of its first
        ``full_extras`` output)."""
        return []

    def stream_tensors(self, config) -> int:
        """Stream-sized tensors of cache state per block and context (anchor input and residual,
        the previous input with ``reference="previous"``, and the kind's own)."""
        return 2 + (config.reference == "previous")

    def describe(self, config) -> str:
        """One line for ``explain``."""
        return self.name
