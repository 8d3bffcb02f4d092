"""The graph contract: the extra inputs and outputs a rewritten graph has beyond the model's own.

Every pass that gives the graph state, controls, weights or accumulators adds them here
(``GraphContract.add_input`` / ``add_output``), and everyone who runs a rewritten graph (the
runtimes, AOTInductor export, the exported-package loader) builds its extra inputs with
``bind`` and reads its outputs back with ``split``; nobody else knows the layout:

    inputs  = the model's inputs + ``inputs`` (placeholder order, whichever pass added them)
    outputs = the model's outputs + ``outputs`` (one (role, name) per extra output)

Roles of an input (``TensorSpec.role``): "state" (carried from call to call by the runtime, per
CFG context; its new value is the output of the same name), "control" (set by the runtime every
call, not carried), "weight" (calibrated maps: constant, or replaced by an online refit),
"accum" (online-calibration statistics, carried per graph). Output roles: "state", "accum"
(the new value of the input of that name) and "trace" ("delta", "threshold", "approx": [L]
per block, read by ``stats()``). See docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

ROLES = ("state", "control", "weight", "accum")
TRACE = ("delta", "threshold", "approx")


@dataclass
class TensorSpec:
    """One extra graph input.

    Attributes:
        role: one of ``ROLES``. name: unique in the graph ("<block>.<what>.<stream>").
        shape: ints, or SymInts in a graph traced with dynamic shapes (the runtime evaluates
            them per call, ``runtime.shapes.ShapeBinder``). dtype: its dtype.
        fill: the initial value (state, controls; NaN/inf allowed). block, stream, key: what a
            weight or accumulator belongs to (``key``: "weight", "bias", "u", "v", "ready" for
            weights; ``ops.maps.ACCUM_KEYS`` for accumulators).
    """

    role: str
    name: str
    shape: tuple
    dtype: torch.dtype
    fill: float = 0.0
    block: str | None = None
    stream: int | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"TensorSpec.role: expected one of {ROLES}, got {self.role!r}")
        self.shape = tuple(self.shape)

    def initial(self, device, shape: Callable = tuple) -> torch.Tensor:
        """A tensor of ``shape(self.shape)`` filled with ``fill`` (integers truncated)."""
        fill = self.fill if self.dtype.is_floating_point or not math.isfinite(self.fill) else int(self.fill)
        return torch.full(shape(self.shape), fill, dtype=self.dtype, device=device)


def state_spec(name: str, shape, dtype: torch.dtype, fill: float) -> TensorSpec:
    return TensorSpec("state", name, shape, dtype, fill)


def control_spec(name: str, shape, dtype: torch.dtype, fill: float) -> TensorSpec:
    return TensorSpec("control", name, shape, dtype, fill)


def weight_spec(name: str, block: str, stream: int, key: str, shape, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec("weight", name, shape, dtype, 0.0, block, stream, key)


def accum_spec(name: str, block: str, stream: int, key: str, shape, dtype: torch.dtype) -> TensorSpec:
    return TensorSpec("accum", name, shape, dtype, 0.0, block, stream, key)


class Outputs(NamedTuple):
    """A rewritten graph's outputs, split by role (``GraphContract.split``)."""

    user: list
    state: list  # new values, in ``GraphContract.state`` order
    trace: tuple  # (delta [L], threshold [L], approx [L]) or () when the graph has no trace
    accums: list  # new values, in ``GraphContract.accums`` order


@dataclass
class GraphContract:
    """The extra inputs and outputs of one rewritten graph (see the module docstring).

    Args:
        num_user_inputs: the model's own graph inputs (Dynamo's arguments).
        num_user_outputs: the model's own graph outputs. output_is_tuple: how they return.
    """

    num_user_inputs: int
    num_user_outputs: int
    output_is_tuple: bool = True
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    # the role views and the output index, derived once (the runtime reads them every call);
    # cleared by add_input / add_output
    _views: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    # building ----------------------------------------------------------------------------
    def add_input(self, spec: TensorSpec) -> TensorSpec:
        """Register an extra input (the pass inserts its placeholder after the last one).

        Raises:
            ValueError: a name already taken."""
        if any(s.name == spec.name for s in self.inputs):
            raise ValueError(f"graph contract: input {spec.name!r} added twice")
        self.inputs.append(spec)
        self._views.clear()
        return spec

    def add_output(self, role: str, name: str) -> None:
        """Register an extra output (the pass appends it to the graph's outputs)."""
        if role in ("state", "accum") and not any(s.role == role and s.name == name for s in self.inputs):
            raise ValueError(f"graph contract: output {role} {name!r} has no input of that name")
        self.outputs.append((role, name))
        self._views.clear()

    # reading -----------------------------------------------------------------------------
    def _view(self, key: str, make: Callable):
        if key not in self._views:
            self._views[key] = make()
        return self._views[key]

    def of_role(self, role: str) -> list[TensorSpec]:
        """The inputs of ``role``, in placeholder order (do not modify the list)."""
        return self._view(role, lambda: [s for s in self.inputs if s.role == role])

    @property
    def state(self) -> list[TensorSpec]:
        return self.of_role("state")

    @property
    def controls(self) -> list[TensorSpec]:
        return self.of_role("control")

    @property
    def weights(self) -> list[TensorSpec]:
        return self.of_role("weight")

    @property
    def accums(self) -> list[TensorSpec]:
        return self.of_role("accum")

    def initial_state(self, device, shape: Callable = tuple) -> list[torch.Tensor]:
        """Fresh state tensors in ``state`` order (``shape`` evaluates symbolic shapes)."""
        return [s.initial(device, shape) for s in self.state]

    def bind(self, state: Sequence[torch.Tensor] = (), controls: Mapping[str, torch.Tensor] | None = None,
             weights: Mapping[str, torch.Tensor] | None = None,
             accums: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The extra inputs of a call, in placeholder order.

        Args:
            state: one tensor per ``state`` spec, in that order. controls, weights, accums:
                {spec name: tensor} (every name of the role that the graph has).

        Raises:
            KeyError: a control, weight or accumulator the graph needs is missing.
        """
        by_role = {"control": controls or {}, "weight": weights or {}, "accum": accums or {}}
        it = iter(state)
        out = []
        for s in self.inputs:
            out.append(next(it) if s.role == "state" else by_role[s.role][s.name])
        return out

    def split(self, outs: Sequence) -> Outputs:
        """The graph's outputs by role (state and accumulators in input order)."""
        nu = self.num_user_outputs
        state_at, trace_at, accum_at = self._view("split", self._output_positions)
        return Outputs(list(outs[:nu]), [outs[i] for i in state_at], tuple(outs[i] for i in trace_at),
                       [outs[i] for i in accum_at])

    def _output_positions(self) -> tuple[list[int], list[int], list[int]]:
        """Output positions of the new state (state order), the trace (or none) and the accumulators."""
        at = {o: self.num_user_outputs + i for i, o in enumerate(self.outputs)}
        trace = [at[("trace", k)] for k in TRACE] if ("trace", TRACE[0]) in at else []
        return [at[("state", s.name)] for s in self.state], trace, [at[("accum", s.name)] for s in self.accums]

    def user_result(self, user: Sequence):
        """The model's own return value from its outputs."""
        return tuple(user) if self.output_is_tuple else user[0]

    def state_position(self, name: str) -> int | None:
        """The position of state ``name`` in ``split(...).state`` (None if the graph has none)."""
        return next((i for i, s in enumerate(self.state) if s.name == name), None)

    @property
    def step_index(self) -> int | None:
        """Position in ``state`` of the trajectory step counter ("step"), if the graph has one."""
        return self._view("step", lambda: next((i for i, s in enumerate(self.state) if s.name == "step"), None))
