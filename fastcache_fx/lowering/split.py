"""Split a rewritten graph at its block conds: glue pieces and per-block branch pieces.

TensorRT has no cond converter (docs/deployment.md "TensorRT"), so ``lowering="tensorrt"`` and
``export(format="tensorrt")`` cut the graph produced by ``passes.block_cache`` into

    glue_0, block_0 (approx | full), glue_1, block_1 (approx | full), ..., glue_L

where each glue piece holds the nodes between two conds (patch embedding, time embedding, the
block decisions, the state updates, the output layer) and each block piece holds the two branch
graphs of one ``torch.cond``. Every piece is handed to a pluggable *engine compiler*
(TensorRT on CUDA; eager or ``torch.export`` programs in the CPU tests), and ``SplitProgram``
runs the pieces in order, choosing the branch of each block from its predicate (one host sync
per block, as Inductor's lowering of cond does). Parameters are baked into the pieces as
buffers, so the program is called with the rewritten graph's non-parameter inputs only
(parameter positions are accepted and ignored, which is what a Dynamo backend passes).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx

from .. import torch_compat
from ..passes.blocks import is_param
from ..passes.graph_utils import node_value

#: ``engine_compiler(gm, example_inputs, name) -> callable``: lowers one piece.
EngineCompiler = Callable[[fx.GraphModule, list, str], Callable]


def eager_engine(gm: fx.GraphModule, example_inputs: list, name: str):
    """The engine compiler that runs a piece as its FX GraphModule (CPU tests, debugging)."""
    return gm


@dataclass
class Piece:
    """One piece of a split graph.

    ``kind`` is "glue" (``modules["glue"]``) or "block" (``modules["approx"]``,
    ``modules["full"]``; ``pred`` names the [] bool predicate: True runs approx). ``inputs`` and
    ``outputs`` name values of the program (strings, the rewritten graph's node names).
    """

    kind: str
    name: str
    inputs: list[str]
    outputs: list[str]
    modules: dict[str, fx.GraphModule]
    pred: str | None = None
    engines: dict[str, Callable] = field(default_factory=dict)
    example_inputs: list = field(default_factory=list)


def _val(n: fx.Node):
    return node_value(n)


def _input_placeholder(g: fx.Graph, name: str, source: fx.Node, meta: dict) -> fx.Node:
    """A placeholder of a piece standing for ``source``, a value of the split graph: a placeholder of
    it (a parameter, a user input, state) keeps Dynamo's metadata (its ``_dynamo_source`` and its
    meta: ``tensor_dict`` marks parameters static for CUDA graphs); an intermediate value gets
    ``_dynamo_source = None``, as the pieces of Dynamo's DDPOptimizer do."""
    ph = g.placeholder(name)
    ph.meta = dict(source.meta) if source.op == "placeholder" else {}
    ph.meta.update(meta)
    torch_compat.set_placeholder_source(ph, source if source.op == "placeholder" else None)
    return ph


def _piece_module(nodes: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node],
                  consts: dict[fx.Node, torch.Tensor]) -> fx.GraphModule:
    """GraphModule computing ``outputs`` (tuple) from ``inputs``; ``consts`` become buffers."""
    root = torch.nn.Module()
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs):
        env[n] = _input_placeholder(g, f"in{i}_{n.name}", n, {"val": _val(n)})
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a in consts:
                name = f"c{len(root._buffers)}"
                root.register_buffer(name, consts[a].detach())
                env[a] = g.get_attr(name)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(root, g)


def _bake_branch(branch: fx.GraphModule, operands: Sequence, consts: dict[fx.Node, torch.Tensor]) -> fx.GraphModule:
    """A branch graph whose parameter operands are buffers: placeholders = non-constant operands."""
    root = torch.nn.Module()
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    phs = [n for n in branch.graph.nodes if n.op == "placeholder"]
    seen: set[fx.Node] = set()
    for ph, op in zip(phs, operands):
        if isinstance(op, fx.Node) and op in consts:
            name = f"c{len(root._buffers)}"
            root.register_buffer(name, consts[op].detach())
            env[ph] = g.get_attr(name)
        elif isinstance(op, fx.Node) and op not in seen:  # one Dynamo source per piece input
            seen.add(op)
            env[ph] = _input_placeholder(g, ph.name, op, ph.meta)
        else:
            env[ph] = g.placeholder(ph.name)
            env[ph].meta = dict(ph.meta)
            torch_compat.forget_placeholder_source(env[ph])
    for n in branch.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            g.output(fx.map_arg(n.args[0], lambda a: env[a]))
            continue
        if n.op == "get_attr":  # nested attributes of the branch (not produced by our pass)
            root.register_module(n.target.split(".")[0], getattr(branch, n.target.split(".")[0]))
        env[n] = g.node_copy(n, lambda a: env[a])
    return fx.GraphModule(root, g)


def split_graph(gm: fx.GraphModule, example_inputs: Sequence, block_names: Sequence[str] | None = None,
                bake_params: bool = True) -> tuple[list[Piece], list[str | None], list[str]]:
    """Cut ``gm`` (output of ``apply_block_cache``) at its conds.

    Args:
        gm: the rewritten graph; parameters are placeholders (``is_param``).
        example_inputs: one real value per placeholder (parameters are baked from these).
        block_names: names of the blocks in cond order (``BlockCacheResult.blocks``); default:
            the cond's branch module tag.
        bake_params: parameters become buffers of the pieces (engines, exports); False keeps
            them inputs of the pieces (``lowering.inductor_split``: Inductor reads them where the
            model holds them, and each piece carries ``gm``'s Dynamo metadata so that AOTAutograd
            marks them static for CUDA graphs).

    Returns:
        (pieces in execution order, program input names per placeholder (None for a baked
        parameter), names of the graph outputs).

    Raises:
        ValueError: ``example_inputs`` does not match the placeholders.
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(f"example_inputs: expected {len(placeholders)} values, got {len(example_inputs)}")
    consts = {p: x for p, x in zip(placeholders, example_inputs)
              if bake_params and is_param(p) and isinstance(x, torch.Tensor)}
    input_names = [None if p in consts else p.name for p in placeholders]
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs = list(out_node.args[0]) if isinstance(out_node.args[0], (tuple, list)) else [out_node.args[0]]

    # group nodes: runs of glue between conds; a cond owns its getitem users
    groups: list[tuple[str, list[fx.Node]]] = []
    current: list[fx.Node] = []
    owned: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "output") or n in owned:
            continue
        if n.op == "get_attr" and all(torch_compat.is_cond(u.target) for u in n.users):
            continue  # branch modules: taken by their cond
        if n.op == "call_function" and torch_compat.is_cond(n.target):
            if current:
                groups.append(("glue", current))
                current = []
            gets = [u for u in n.users if u.op == "call_function" and u.target is operator.getitem]
            if len(gets) != len(n.users):
                raise ValueError(f"cond {n.name}: every user must be a getitem")
            owned.update(gets)
            groups.append(("block", [n] + sorted(gets, key=lambda u: u.args[1])))
            continue
        current.append(n)
    if current:
        groups.append(("glue", current))

    where: dict[fx.Node, int] = {}
    for gi, (_, nodes) in enumerate(groups):
        for n in nodes:
            where[n] = gi

    pieces: list[Piece] = []
    glue_i = block_i = 0
    for gi, (kind, nodes) in enumerate(groups):
        if kind == "glue":
            members = set(nodes)
            ins: dict[fx.Node, None] = {}
            for n in nodes:
                for a in n.all_input_nodes:
                    if a not in members and a not in consts:
                        ins.setdefault(a, None)
            outs = [n for n in nodes if any(u not in members for u in n.users)]
            mod = _piece_module(nodes, list(ins), outs, consts)
            pieces.append(Piece("glue", f"glue_{glue_i}", [a.name for a in ins], [o.name for o in outs], {"glue": mod}))
            glue_i += 1
        else:
            cond, gets = nodes[0], nodes[1:]
            pred, t_attr, f_attr, operands = cond.args
            operands = list(operands)
            live = [o for o in operands if not (isinstance(o, fx.Node) and o in consts)]
            approx = _bake_branch(getattr(gm, t_attr.target), operands, consts)
            full = _bake_branch(getattr(gm, f_attr.target), operands, consts)
            name = block_names[block_i] if block_names is not None and block_i < len(block_names) else t_attr.target
            block_i += 1
            pieces.append(Piece("block", name, [o.name for o in live], [g.name for g in gets],
                                {"approx": approx, "full": full}, pred=pred.name))
    if not bake_params:  # what AOTAutograd reads off a Dynamo graph (passes.graph_utils.clone_graph_module)
        for p in pieces:
            for mod in p.modules.values():
                mod.meta = dict(gm.meta)
                if hasattr(gm, "_param_name_to_source"):
                    torch_compat.copy_param_sources(gm, mod)
    return pieces, input_names, [o.name for o in outputs]


class SplitProgram:
    """Runs split pieces in order and picks each block's branch (the TensorRT and
    ``inductor_split`` runtime).

    Called like the rewritten graph: ``program(*inputs)`` with one value per placeholder of the
    rewritten graph (parameter positions ignored where the pieces baked them) and returns the
    graph's output tuple. ``program.branches`` counts how often each branch ran,
    ``program.host_reads`` the predicates read on the host (one per cond and call).
    ``copy_outputs``: return copies of the outputs (pieces that are CUDA graphs return tensors of
    their memory pool, which their next replay overwrites).
    """

    copy_outputs = False

    def __init__(self, pieces: list[Piece], input_names: list[str | None], output_names: list[str]) -> None:
        self.pieces = pieces
        self.input_names = input_names
        self.output_names = output_names
        self.branches = {p.name: {"approx": 0, "full": 0} for p in pieces if p.kind == "block"}
        self.host_reads = 0

    def __call__(self, *args):
        env = {name: a for name, a in zip(self.input_names, args) if name is not None}
        for p in self.pieces:
            ins = [env[n] for n in p.inputs]
            if p.kind == "glue":
                outs = p.engines["glue"](*ins)
            else:
                which = "approx" if bool(env[p.pred]) else "full"  # host sync, as Inductor's cond
                self.host_reads += 1
                self.branches[p.name][which] += 1
                outs = p.engines[which](*ins)
            if isinstance(outs, torch.Tensor):
                outs = (outs,)
            env.update(zip(p.outputs, outs))
        if self.copy_outputs:
            return tuple(env[n].clone() for n in self.output_names)
        return tuple(env[n] for n in self.output_names)


def compile_split(gm: fx.GraphModule, example_inputs: Sequence, engine_compiler: EngineCompiler = eager_engine,
                  block_names: Sequence[str] | None = None, bake_params: bool = True) -> SplitProgram:
    """Split ``gm`` at its conds and lower every piece with ``engine_compiler``.

    Each piece's example inputs come from one eager run of the pieces on ``example_inputs``
    (both branches of a block get the block's operands).

    Args:
        gm: output of ``apply_block_cache``.
        example_inputs: real values for every placeholder (user inputs, parameters, state,
            controls, weights), e.g. what the backend passes to ``compile_graph``.
        engine_compiler: ``(piece GraphModule, example inputs, piece name) -> callable``; piece
            names are ``glue_<i>`` and ``<block>.approx`` / ``<block>.full``.
        block_names: ``BlockCacheResult.blocks`` (names the block pieces).
        bake_params: parameters as buffers of the pieces (True) or as their inputs (``split_graph``).

    Returns:
        a SplitProgram with the same call convention and outputs as ``gm``.

    Raises:
        ValueError: a value other than a tensor would cross between pieces.
    """
    pieces, input_names, output_names = split_graph(gm, example_inputs, block_names, bake_params)
    env = {name: a for name, a in zip(input_names, example_inputs) if name is not None}
    with torch.no_grad():
        for p in pieces:
            ins = [env[n] for n in p.inputs]
            p.example_inputs = ins
            if p.kind == "glue":
                outs = p.modules["glue"](*ins)
            else:
                outs = p.modules["approx" if bool(env[p.pred]) else "full"](*ins)
            for name, v in zip(p.outputs, outs):
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"split: value {name} ({type(v).__name__}) crosses pieces; only tensors may")
            env.update(zip(p.outputs, outs))
    for p in pieces:
        for key, mod in p.modules.items():
            label = p.name if p.kind == "glue" else f"{p.name}.{key}"
            p.engines[key] = engine_compiler(mod, list(p.example_inputs), label)
    return SplitProgram(pieces, input_names, output_names)
