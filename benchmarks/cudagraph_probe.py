"""Which route gives the step level CUDA graphs: Inductor's graph partitioning or the split lowering?

    PYTHONPATH=. python benchmarks/cudagraph_probe.py [--json benchmarks/cudagraph_probe.json]

Runs on CPU (no GPU needed) and reads what Inductor decides at compile time for the tiny zoo DiT
at ``cache_level="step"`` under ``mode="reduce-overhead"``:

1. The whole graph (``lowering="inductor"``, one ``torch.cond``), with
   ``torch._inductor.config.graph_partition`` True (torch 2.13's default) and False. On CPU the
   cond lowering never sees a Triton device, so the probe makes its ``is_triton`` test answer True
   *inside the cond lowering only* (what it answers for CUDA operands): the reason Inductor then
   records on the compiled graph (``CompiledFxGraph.disabled_cudagraphs_reason``) is the reason
   the whole graph gets no CUDA graph on a GPU.
2. The split lowering (``lowering="inductor_split"``): the reason recorded per piece (on CPU only
   "cpu device", never the cond), whether any piece holds a cond, and the static input indices
   Inductor's CUDA-graph wrapper gets per piece (parameters must be static: a non-static input
   is copied into the graph's buffers at every replay).

Prints one JSON record (and writes it with ``--json``). docs/cudagraphs.md reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

import fastcache_fx
from fastcache_fx import zoo


def _record_reasons():
    """Patch CompiledFxGraph.__init__ to keep every compiled graph's CUDA-graph disable reason."""
    from torch._inductor import output_code

    reasons: list = []
    orig = output_code.CompiledFxGraph.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        reasons.append(self.disabled_cudagraphs_reason)

    output_code.CompiledFxGraph.__init__ = init
    return reasons, lambda: setattr(output_code.CompiledFxGraph, "__init__", orig)


def _cond_sees_cuda():
    """Make the cond lowering's ``is_triton(operand)`` answer True, as for CUDA operands."""
    from torch._inductor import lowering

    cond = torch.ops.higher_order.cond
    orig = lowering.lowerings[cond]

    def patched(*a, **k):
        saved = lowering.is_triton
        lowering.is_triton = lambda x: True
        try:
            return orig(*a, **k)
        finally:
            lowering.is_triton = saved

    lowering.lowerings[cond] = patched
    return lambda: lowering.lowerings.__setitem__(cond, orig)


class _StaticIdx(logging.Handler):
    """Collects the "static input idxs compile_fx_inner: [...]" lines of Inductor's
    ``cudagraph_static_inputs`` log artifact."""

    def __init__(self):
        super().__init__()
        self.idxs: list[list[int]] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("static input idxs compile_fx_inner:"):
            self.idxs.append(list(record.args[0]) if record.args else [])


def _record_weight_inputs(model):
    """Patch Inductor's compile_fx to record, per compiled graph, which example inputs are the
    model's parameters or buffers (by storage); returns (list of per-graph position lists, undo)."""
    import torch._inductor.compile_fx as cf

    ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: list[list[int]] = []
    orig = cf.compile_fx

    depth = [0]

    def spy(gm, example_inputs, *a, **k):
        if depth[0] == 0:  # compile_fx calls itself once more to apply its config patches
            seen.append([i for i, x in enumerate(example_inputs)
                         if isinstance(x, torch.Tensor) and x.data_ptr() in ptrs])
        depth[0] += 1
        try:
            return orig(gm, example_inputs, *a, **k)
        finally:
            depth[0] -= 1

    cf.compile_fx = spy
    return seen, lambda: setattr(cf, "compile_fx", orig)


def compile_once(lowering: str, partition: bool, layers: int = 4) -> dict:
    """Compile the tiny DiT once at the step level under mode="reduce-overhead"; what Inductor recorded."""
    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=layers)
    weights, undo_weights = _record_weight_inputs(model)
    reasons, undo_reasons = _record_reasons()
    undo_cond = _cond_sees_cuda()
    handler = _StaticIdx()
    torch._logging.set_logs(cudagraph_static_inputs=True)
    log = logging.getLogger("torch._inductor.compile_fx.__cudagraph_static_inputs")
    log.addHandler(handler)
    try:
        with torch._inductor.config.patch(graph_partition=partition):
            backend = fastcache_fx.FastCacheBackend(cache_level="step", lowering=lowering, mode="reduce-overhead")
            compiled = torch.compile(model, backend=backend, dynamic=False)
            compiled(**kw)
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
        undo_cond()
        undo_reasons()
        undo_weights()
    from fastcache_fx.runtime import registry

    # per compiled graph: its weight inputs (the model's parameters and buffers) all static, and
    # how many other inputs are static (AOTAutograd positions equal ours: nothing is lifted)
    graphs = [{"weight_inputs": len(w), "static": len(st), "weights_all_static": set(w) <= set(st),
               "other_static": len(set(st) - set(w))} for w, st in zip(weights, handler.idxs)]
    out = {"lowering": lowering, "graph_partition": partition, "disable_reasons": reasons, "graphs": graphs}
    prog = next((g.compiled for g in registry.lookup(model).graphs if hasattr(getattr(g, "compiled", None), "pieces")),
                None)
    if prog is not None:
        out["pieces"] = [{"name": p.name, "kind": p.kind,
                          "conds": sum(n.target is torch.ops.higher_order.cond
                                       for m in p.modules.values() for n in m.graph.nodes)}
                         for p in prog.pieces]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the record here")
    args = ap.parse_args(argv)
    rec = {"torch": torch.__version__, "graph_partition_default": bool(torch._inductor.config.graph_partition),
           "runs": [compile_once("inductor", True), compile_once("inductor", False),
                    compile_once("inductor_split", True)]}
    text = json.dumps(rec, indent=1, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
