"""``lowering="inductor_split"``: the step cut at its decision, each piece a CUDA graph.

Inductor lowers ``torch.cond`` with a host-side ``if pred.item()`` and, for CUDA operands, sets
``disable_cudagraphs_reason = "control flow operator: torch.cond."`` on the whole graph
(torch/_inductor/lowering.py, torch 2.13), so ``mode="reduce-overhead"`` gives a graph holding a
cond no CUDA graph at all; graph partitioning does not change that (docs/cudagraphs.md). At the
step and span levels a step holds one cond per span, so the rewritten graph is cut at its conds
(``lowering.split``, as for TensorRT) into pieces free of control flow:

    glue_0 (front blocks, the decision) | span: approx or full | glue_1 (state updates, output layer)

and each piece is compiled on its own by Inductor. On CUDA the pieces are compiled with
``mode="reduce-overhead"`` (unless ``torch.compile`` was given another mode), so each is a CUDA
graph of Inductor's CUDA-graph trees: parameters are static inputs (read in place, never
copied), the other inputs are copied into the graph's static input buffers at each replay, the
outputs live in the trees' memory pool, and ``SplitProgram`` reads the predicate on the host once
per cond (one sync per step at the step level) to pick the branch: a tree path per branch. The
program copies its outputs (the model's output, the new state, the decision trace) out of the pool
at the end of each step (``SplitProgram.copy_outputs``): the next step's replay overwrites the
pool, and a pipeline that calls the model twice per step (CFG as two calls) still holds the first
output when the second call runs. Those copies (the output and about two stream tensors of state
at the step level) and the trees' copy of the non-parameter inputs into the graphs' static input
buffers are the price of replaying.

Parameters stay inputs of the pieces (not baked), so one compiled piece set serves every model
that shares the compiled graph (``runtime.state.SharedGraph``), as the whole-graph lowering does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx

from .inductor import compile_graph
from .split import SplitProgram, compile_split
from .. import torch_compat

#: the mode each piece gets on CUDA when ``torch.compile`` named none (CUDA graphs)
CUDA_MODE = "reduce-overhead"


def piece_mode(mode: str | None, device: torch.device) -> str | None:
    """The ``torch.compile`` mode the pieces are compiled with: ``mode`` where one was given
    (``"max-autotune-no-cudagraphs"`` keeps the split without CUDA graphs), else
    ``"reduce-overhead"`` on CUDA and Inductor's default elsewhere."""
    if mode is not None:
        return mode
    return CUDA_MODE if device.type == "cuda" else None


def uses_cudagraphs(mode: str | None) -> bool:
    """Whether a piece compiled with ``mode`` is a CUDA graph (Inductor's ``triton.cudagraphs``
    option of that mode), i.e. its outputs live in a pool the next step overwrites."""
    return torch_compat.cudagraphs_in_mode(mode)


def inductor_engine(mode: str | None):
    """An engine compiler for ``lowering.split``: ``(piece, example inputs, name) -> callable``,
    one Inductor compile per piece with ``mode``'s options.

    Each piece is compiled outside Dynamo's tracing context of the whole graph (a piece is a
    graph of its own: AOTAutograd records its metadata, static inputs included, on a fresh
    context instead of overwriting the whole graph's)."""

    def engine(gm: fx.GraphModule, example_inputs: list, name: str):
        with torch_compat.outside_tracing_context():
            return compile_graph(gm, list(example_inputs), mode)

    return engine


def compile_inductor_split(gm: fx.GraphModule, example_inputs: Sequence, block_names: Sequence[str] | None,
                           mode: str | None) -> SplitProgram:
    """Lower a rewritten graph (``apply_block_cache`` at the step or span level) as pieces.

    Args:
        gm: the rewritten Dynamo graph (parameters are placeholders).
        example_inputs: one real tensor per placeholder (user inputs, parameters, state, controls).
        block_names: ``BlockCacheResult.blocks`` (names the branch pieces).
        mode: the pieces' ``torch.compile`` mode (``piece_mode``).

    Returns:
        a ``SplitProgram`` called like ``gm``: ``program(*inputs)`` -> ``gm``'s output tuple;
        ``program.host_reads`` counts the predicates read on the host.

    Raises:
        ValueError: a value other than a tensor would cross between two pieces.
    """
    program = compile_split(gm, example_inputs, inductor_engine(mode), block_names, bake_params=False)
    program.copy_outputs = uses_cudagraphs(mode)
    return program
