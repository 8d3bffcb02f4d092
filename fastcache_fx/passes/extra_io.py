"""How a pass adds the graph contract's extra inputs and outputs to a graph, and the one
trajectory clock every pass with per-trajectory state shares (``contract.GraphContract``)."""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

from ..contract import GraphContract, TensorSpec, accum_spec, control_spec, state_spec, weight_spec
from ..approx.base import meta as _meta
from ..ops import decision as D
from .graph_utils import graph_io, insert_placeholder, node_value

#: ``node.meta`` key of the clock's nodes ("step", "t"); node meta survives graph copies
CLOCK = "fc_clock"


def set_val(node: fx.Node, val) -> fx.Node:
    """Set the example value of a node a pass created (``meta["val"]``, Dynamo's ``example_value``)."""
    node.meta["val"] = val
    node.meta["example_value"] = val
    return node


def symbolic(shape) -> bool:
    return any(isinstance(d, torch.SymInt) for d in shape)


def meta_value(shape, dtype: torch.dtype, placeholders: list[fx.Node]) -> torch.Tensor:
    """The ``meta["val"]`` of a new input: a meta tensor, or, for a symbolic shape, a fake tensor of
    the graph's own fake mode (its SymInts belong to that mode's ShapeEnv)."""
    if not symbolic(shape):
        return torch.empty(shape, dtype=dtype, device="meta")
    vals = [node_value(p) for p in placeholders]
    mode = next(v.fake_mode for v in vals if hasattr(v, "fake_mode"))
    device = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
    with mode:
        return torch.empty(shape, dtype=dtype, device=device)


#: the control of a graph without a timestep input that carries the model's timestep (``ExtraIO.clock``)
TIMESTEP_CONTROL = "timestep"


def insert_trajectory_step(graph: fx.Graph, before: fx.Node, timestep: fx.Node | None, prev_t: fx.Node,
                           step: fx.Node, t_first: fx.Node | None = None):
    """Insert ``ops.decision.trajectory_step`` before ``before``: (step [] int64, t [] float32)
    nodes, with ``meta["val"]`` set, and the new t_first node when ``t_first`` is given."""
    with graph.inserting_before(before):
        traj = graph.call_function(D.trajectory_step, (timestep, prev_t, step, t_first))
        step_node = set_val(graph.call_function(operator.getitem, (traj, 0)), _meta((), torch.int64))
        t_node = set_val(graph.call_function(operator.getitem, (traj, 1)), _meta())
        if t_first is not None:
            first = set_val(graph.call_function(operator.getitem, (traj, 2)), _meta())
            return step_node, t_node, first
    return step_node, t_node


class ExtraIO:
    """Adds extra inputs to ``graph`` (each after the last placeholder) and registers them in
    ``contract``; ``outputs`` collects (role, name, node) for ``finish``.

    Args:
        graph: the graph being rewritten. contract: its contract (a new one from the graph's
            inputs and outputs when None: the first pass).
    """

    def __init__(self, graph: fx.Graph, contract: GraphContract | None = None) -> None:
        self.graph = graph
        placeholders, self.out_node, outs, is_tuple = graph_io(graph)
        self.placeholders = placeholders
        self.contract = contract if contract is not None else GraphContract(len(placeholders), len(outs), is_tuple)
        self.last = placeholders[-1]
        self.outputs: list[tuple[str, str, fx.Node]] = []
        self.specs: dict[fx.Node, TensorSpec] = {}  # placeholders this pass added

    def name(self, ph: fx.Node) -> str:
        """The contract name of a placeholder this pass added."""
        return self.specs[ph].name

    def add(self, spec: TensorSpec, val=None) -> fx.Node:
        """The placeholder of a new extra input ``spec`` (``val``: its example value)."""
        self.contract.add_input(spec)
        if val is None:
            val = meta_value(spec.shape, spec.dtype, self.placeholders)
        self.last = insert_placeholder(self.graph, self.last, "fc_" + re.sub(r"\W", "_", spec.name), val)
        self.specs[self.last] = spec
        return self.last

    def state(self, name: str, shape, dtype: torch.dtype, fill: float) -> fx.Node:
        return self.add(state_spec(name, shape, dtype, fill))

    def control(self, name: str, shape, dtype: torch.dtype, fill: float) -> fx.Node:
        return self.add(control_spec(name, shape, dtype, fill))

    def weight(self, name: str, block: str, stream: int, key: str, shape, dtype: torch.dtype) -> fx.Node:
        return self.add(weight_spec(name, block, stream, key, shape, dtype))

    def accum(self, name: str, block: str, stream: int, key: str, shape, dtype: torch.dtype) -> fx.Node:
        return self.add(accum_spec(name, block, stream, key, shape, dtype))

    def output(self, role: str, name: str, node: fx.Node) -> None:
        self.outputs.append((role, name, node))

    def clock(self, timestep: fx.Node | None) -> tuple[fx.Node, fx.Node]:
        """(step [] int64, t [] float32) of the graph's trajectory clock: the one an earlier pass
        inserted (found by its ``CLOCK`` meta), else a new one with its state "step" / "prev_t" /
        "t_first" (``ops.decision.trajectory_step``: either direction of the timestep), right
        after the placeholders. A graph without a timestep input (``None``: Dynamo split the model
        at a graph break and an earlier fragment took it) reads it from the control
        ``TIMESTEP_CONTROL``, which the runtime fills with the timestep the model's glue graph
        saw in the same call (``runtime.state``), NaN if none."""
        found = {n.meta[CLOCK]: n for n in self.graph.nodes if CLOCK in n.meta}
        if found:
            return found["step"], found["t"]
        if timestep is None:  # a fragment after a graph break: the runtime passes the model's timestep
            timestep = self.control(TIMESTEP_CONTROL, (), torch.float32, float("nan"))
        step_in = self.state("step", (), torch.int64, -1)
        prev_t_in = self.state("prev_t", (), torch.float32, float("-inf"))
        first_in = self.state("t_first", (), torch.float32, float("nan"))
        step, t, first = insert_trajectory_step(self.graph, self.last.next, timestep, prev_t_in, step_in, first_in)
        step.meta[CLOCK], t.meta[CLOCK] = "step", "t"
        self.output("state", "step", step)
        self.output("state", "prev_t", t)
        self.output("state", "t_first", first)
        return step, t

    def finish(self) -> GraphContract:
        """Append the collected outputs to the graph's output node and register them."""
        outs = list(self.out_node.args[0]) if isinstance(self.out_node.args[0], (tuple, list)) else [self.out_node.args[0]]
        for role, name, _ in self.outputs:
            self.contract.add_output(role, name)
        self.out_node.args = (tuple(outs) + tuple(n for _, _, n in self.outputs),)
        self.outputs = []
        return self.contract


class Cursor:
    """Inserts nodes one after another from a position in a graph."""

    def __init__(self, graph: fx.Graph, after: fx.Node) -> None:
        self.graph, self.node = graph, after

    def call(self, fn, *args, val=None, **kwargs) -> fx.Node:
        with self.graph.inserting_after(self.node):
            self.node = self.graph.call_function(fn, args, kwargs)
        return set_val(self.node, val) if val is not None else self.node

    def method(self, name: str, *args, val=None) -> fx.Node:
        with self.graph.inserting_after(self.node):
            self.node = self.graph.call_method(name, args)
        return set_val(self.node, val) if val is not None else self.node

    def get(self, node: fx.Node, i: int, val=None) -> fx.Node:
        return self.call(operator.getitem, node, i, val=val)

    def unpack(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self.get(node, i) for i in range(n)]
