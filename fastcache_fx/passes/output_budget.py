"""The output budget's graph-level state (``decision="output"``, ``ops.output_error``): the gain g,
the run's spent budget A and this step's predicted output error E, and, after the last block, the
gain measured by replaying the output layer on the last block's output plus its error
(``passes.tail.replay_tail``). Used by ``passes.block_cache``."""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..approx.base import meta as _meta
from ..config import FastCacheConfig
from ..ops import output_error as O
from .blocks import BlockRegion
from .extra_io import ExtraIO, set_val
from .graph_utils import ancestors, node_value
from .shards import sum_weights
from .tail import replay_tail


def output_budget(io: ExtraIO, regions: list[BlockRegion], config: FastCacheConfig):
    """``decision="output"``: the graph-level state of the output budget (``ops.output_error``):
    the gain g ("output.gain", NaN until measured, or 1 when the graph has no output layer after
    its last block to measure it with), the run's spent budget A ("output.run_error") and this
    step's predicted output error E ("output.step_error"); None under the other rules."""
    if config.decision != "output":
        return None
    has_tail = bool(tail_streams(io, regions[-1].stream_outputs))
    b = {"tail": has_tail, "gain": io.state("output.gain", (), torch.float32, float("nan") if has_tail else 1.0),
         "run": io.state("output.run_error", (), torch.float32, 0.0),
         "step_error": io.state("output.step_error", (), torch.float32, 0.0),
         # set per call by a sampler-aware caller (runtime.quality); 1 and 0 in the bare backend
         "weight": io.control("output.weight", (), torch.float32, 1.0),
         "offset": io.control("output.offset", (), torch.float32, 0.0)}
    b["spent"] = b["run"]
    b["weighted_gain"] = None
    return b


def weigh(cur, b: dict) -> None:
    """Before the first block's decision: the weighted gain w g every decision and ``spend`` use,
    and the step's starting spent budget A + c (controls "output.weight" w, "output.offset" c)."""
    if b["weighted_gain"] is None:
        b["weighted_gain"] = cur.call(torch.mul, b["gain"], b["weight"], val=_meta())
        b["spent"] = b["start"] = cur.call(torch.add, b["run"], b["offset"], val=_meta())


def _user_outputs(io: ExtraIO) -> list[fx.Node]:
    outs = io.out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    return [o for o in outs[:io.contract.num_user_outputs] if isinstance(o, fx.Node)]


def tail_streams(io: ExtraIO, stream_outputs: list[fx.Node]) -> list[int]:
    """The indices of the last block's output streams that the model's output depends on."""
    need = ancestors(_user_outputs(io))
    return [s for s, o in enumerate(stream_outputs) if o in need]


def finish_output_budget(io: ExtraIO, result, b: dict, step_node) -> None:
    """After the last block: the run's spent budget, this step's predicted output error, and the
    gain measured by replaying the output layer on the last block's output plus its error.
    ``result``: the pass's ``BlockCacheResult`` (its process groups)."""
    graph = io.graph
    with graph.inserting_before(io.out_node):
        ends = graph.call_function(O.end_of_step, (b.get("start", b["run"]), b["spent"], b["offset"]))
        run_new = set_val(graph.call_function(operator.getitem, (ends, 0)), _meta())
        step_err = set_val(graph.call_function(operator.getitem, (ends, 1)), _meta())
        gain_new = b["gain"]
        last = b.get("last")
        if b["tail"] and last is not None:
            outs = [last["outs"][s] for s in last["streams"]]
            perturbed = [set_val(graph.call_function(torch.add, (o, last["eps"][s])), node_value(o))
                         for o, s in zip(outs, last["streams"])]
            real, replayed = replay_tail(graph, io.out_node, _user_outputs(io), outs, perturbed)
            if real:
                weights = sum_weights([result.output_shards.get(o, 1) for o in real], result.mesh, result.groups)
                e_out = set_val(graph.call_function(O.tail_errors, (replayed, real),
                                                    {"groups": tuple(result.groups), "weights": weights}), _meta())
                gain_new = set_val(graph.call_function(O.update_gain, (last["ok"], e_out, last["e"], step_node,
                                                                       b["gain"])), _meta())
    io.output("state", "output.gain", gain_new)
    io.output("state", "output.run_error", run_new)
    io.output("state", "output.step_error", step_err)
