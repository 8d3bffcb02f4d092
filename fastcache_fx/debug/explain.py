"""``explain``: what the fastcache backend would do to a model, without compiling anything.

    report = explain(model, hidden_states=x, timestep=t, class_labels=y)
    print(report.text())          # blocks found, blocks left alone and why, graph diff
    report.dump("explain_out")    # before/after dumps and diffs, for ``fastcache-fx diff``

The model's Dynamo graph(s) are captured with a backend that only records them (the model runs
eagerly once); each graph then goes through ``find_blocks`` and ``apply_block_cache`` exactly as
in the backend, and the graph before and after is dumped with stable node names
(``fastcache_fx.debug.dump``). Inductor never runs. With ``TORCH_TRACE`` set, the dumps are
also emitted as tlparse artifacts ``fastcache_before_<i>`` / ``fastcache_after_<i>`` /
``fastcache_diff_<i>``.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx

from .. import approx as approx_kinds
from .. import torch_compat
from ..config import FastCacheConfig
from ..passes.block_cache import BlockCacheResult, apply_block_cache
from ..passes.blocks import find_blocks
from ..passes.graph_utils import clone_graph_module
from .dump import block_dot, graph_text, tag_canonical_names

NO_BLOCKS = "no transformer blocks, compiled with plain Inductor"


@dataclass
class BlockInfo:
    """One block found in a graph: name, module type, node count, stream shapes [(B, N, D)...]
    and the canonical names of its context inputs (``timestep``, ``glue.silu_0``...)."""

    name: str
    module_type: str
    num_nodes: int
    stream_shapes: list[tuple]
    context_inputs: list[str]


@dataclass
class GraphExplanation:
    """What the backend does with one Dynamo graph.

    ``blocks`` are the regions ``find_blocks`` found (rewritten unless ``graph_left_alone``);
    ``left_alone`` holds (block name, reason) from ``find_blocks``; ``graph_left_alone`` is set
    when the whole graph is compiled without cache (no block, dynamic shapes, pass error).
    ``before``/``after`` are ``graph_text`` dumps; ``diff`` their unified diff ("" when the
    graph is left alone); ``dot`` the block-level Graphviz text.
    """

    index: int
    num_nodes: int
    blocks: list[BlockInfo]
    left_alone: list[tuple[str, str]]
    graph_left_alone: str | None
    before: str
    after: str
    diff: str
    dot: str
    result: BlockCacheResult | None = None
    timestep_input: str | None = None


@dataclass
class ExplainReport:
    """``explain``'s answer: one GraphExplanation per captured Dynamo graph (graph-break order)."""

    graphs: list[GraphExplanation]
    config: FastCacheConfig
    approx: str = "residual"
    files: list[Path] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        """Blocks rewritten into ``torch.cond`` over all graphs."""
        return sum(len(g.blocks) for g in self.graphs if g.graph_left_alone is None)

    def _rule(self) -> str:
        c = self.config
        if c.decision == "output":
            target = f", from target_psnr={c.target_psnr} dB" if c.target_psnr is not None else ""
            return (f"decision=output, error_budget={c.error_budget:g}{target} (relative output error of a run of "
                    "approximated steps)")
        if c.decision == "error":
            return f"decision=error, error_budget={c.error_budget}"
        return f"decision=chi2, cache_ratio_threshold={c.cache_ratio_threshold}, significance_level={c.significance_level}"

    def text(self, diff: bool = True) -> str:
        """A human-readable report; ``diff=False`` leaves out the graph diffs."""
        kind = approx_kinds.get(self.approx)
        out = [f"fastcache explain: {len(self.graphs)} graph(s), {self.num_blocks} block(s) rewritten "
               f"(approx={self.approx}, {self._rule()})",
               f"approximation: {kind.describe(self.config)}; cache state: {kind.stream_tensors(self.config)} "
               f"stream-sized tensors per {'block' if self.config.cache_level == 'block' else 'span'} and CFG "
               "context" + (f", stored in {self.config.state_dtype}" if self.config.state_dtype else "")]
        for g in self.graphs:
            out.append(f"\ngraph {g.index}: {g.num_nodes} nodes")
            if g.graph_left_alone:
                out.append(f"  left alone: {g.graph_left_alone}")
            level = g.result.level if g.result is not None else "block"
            # thresholds are per cond: per block at the block level, per span otherwise
            thr = g.result.thresholds if g.result is not None and level == "block" else []
            for k, b in enumerate(g.blocks):
                shapes = ", ".join(str(list(s)) for s in b.stream_shapes)
                # None: the error rule (a per-block estimate) or a symbolic ND (a per-call bound)
                bound = f"  bound {thr[k]:.4g}" if k < len(thr) and thr[k] is not None else ""
                out.append(f"  block {b.name} ({b.module_type}): {b.num_nodes} nodes, streams {shapes}, "
                           f"context: {', '.join(b.context_inputs) or '-'}{bound}")
            for name, why in g.left_alone:
                out.append(f"  left alone: {name}: {why}")
            if level != "block":
                r = g.result
                out.append(f"  cache_level={level}: {len(r.blocks)} cond(s) per step, over "
                           + ", ".join(f"{b} ({n} blocks)" for b, n in zip(r.blocks, r.sizes))
                           + f"; computed every step: {', '.join(r.uncached) or '-'}; cache state "
                           f"{kind.stream_tensors(self.config)} stream-sized tensors per span and CFG context")
                if r.span_reason:
                    out.append(f"  spans: {r.span_reason}")
            if g.result is not None and g.result.state:
                out.append(f"  state inputs: {len(g.result.state)} (fc_*), timestep input: {g.timestep_input}")
            if diff and g.diff:
                out.append("  graph diff (before -> after apply_block_cache):")
                out.append(g.diff.rstrip("\n"))
        return "\n".join(out) + "\n"

    def dump(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``graph_<i>_before.txt``, ``graph_<i>_after.txt``, ``graph_<i>.diff`` and
        ``explain.txt`` (the report without diffs) into ``directory`` (created). Returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for g in self.graphs:
            for suffix, text in (("_before.txt", g.before), ("_after.txt", g.after), (".diff", g.diff)):
                p = d / f"graph_{g.index}{suffix}"
                p.write_text(text)
                paths.append(p)
        p = d / "explain.txt"
        p.write_text(self.text(diff=False))  # the diffs are in graph_<i>.diff
        paths.append(p)
        self.files += paths
        return paths

    def write_dot(self, directory: str | os.PathLike) -> list[Path]:
        """Write one block-level Graphviz file ``graph_<i>.dot`` per graph. Returns the paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for g in self.graphs:
            p = d / f"graph_{g.index}.dot"
            p.write_text(g.dot)
            paths.append(p)
        self.files += paths
        return paths


def unified_diff(before: str, after: str, a: str = "before", b: str = "after", context: int = 3) -> str:
    """``difflib`` unified diff of two texts ("" when equal)."""
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=a, tofile=b, n=context))


def _emit_artifact(name: str, text: str) -> None:
    """A tlparse artifact (only with TORCH_TRACE set; a no-op for torch otherwise)."""
    if not os.environ.get("TORCH_TRACE"):
        return
    torch_compat.emit_trace_artifact(name, text)


def explain_graph(gm: fx.GraphModule, config: FastCacheConfig, index: int = 0, approx: str | None = None) -> GraphExplanation:
    """Explain one Dynamo graph: blocks, blocks left alone, dumps before/after the block-cache pass.

    ``gm`` is not modified (the pass works on a clone whose nodes carry the canonical names).
    """
    gm, _ = clone_graph_module(gm)
    names = tag_canonical_names(gm)  # the pass copies node meta, so its output keeps these names
    search = find_blocks(gm)
    before = graph_text(gm, f"graph {index} before")
    blocks = [BlockInfo(r.name, r.module_type, len(r.nodes), r.stream_shapes, [names[c] for c in r.context_inputs])
              for r in search.regions]
    whole = None
    if not search.regions:
        whole = NO_BLOCKS
    after, result = before, None
    if whole is None:
        try:
            new, result = apply_block_cache(gm, config, search.regions, approx=approx)
            after = graph_text(new, f"graph {index} after")
        except Exception as e:  # report, do not hide: the backend would fail the same way
            whole = f"apply_block_cache failed: {type(e).__name__}: {e}"
    diff = "" if whole is not None else unified_diff(before, after, f"graph_{index}_before", f"graph_{index}_after")
    dot = block_dot(gm, f"graph {index}", cached={b.name for b in blocks} if whole is None else set())
    _emit_artifact(f"fastcache_before_{index}", before)
    _emit_artifact(f"fastcache_after_{index}", after)
    if diff:
        _emit_artifact(f"fastcache_diff_{index}", diff)
    ts = result.timestep_input if result is not None else None
    ts = next((names[n] for n in names if n.name == ts), ts)
    return GraphExplanation(index, sum(1 for _ in gm.graph.nodes), blocks, list(search.left_alone), whole,
                            before, after, diff, dot, result, ts)


def explain(model: torch.nn.Module, *example_args, config: FastCacheConfig | dict | None = None,
            dot_dir: str | os.PathLike | None = None, dump_dir: str | os.PathLike | None = None,
            **example_kwargs) -> ExplainReport:
    """Capture ``model``'s Dynamo graph(s) on the example inputs and explain each one.

    Calls ``torch.compiler.reset()`` first (compiled code of other models is dropped too), then
    runs ``torch.compile(model, backend=<recorder>, dynamic=False)`` once: the model executes
    eagerly, nothing is lowered.

    Args:
        model: the transformer (any nn.Module).
        example_args, example_kwargs: one call's inputs (e.g. ``hidden_states`` [B, C, H, W],
            ``timestep`` [B]).
        config: FastCacheConfig or its options as a dict; None: defaults.
        dot_dir: also write ``graph_<i>.dot`` block-level Graphviz files there.
        dump_dir: also write the dumps there (``ExplainReport.dump``).

    Returns:
        ExplainReport (``.text()`` for the report).

    Raises:
        ValueError: a bad config option (named in the message).
    """
    config = FastCacheConfig.from_options(config)
    approx = approx_kinds.resolve(config).name  # the kind the backend builds (its fallback too)
    graphs: list[GraphExplanation] = []

    def recorder(gm: fx.GraphModule, example_inputs, **kwargs):
        graphs.append(explain_graph(gm, config, len(graphs), approx))
        return gm.forward

    torch.compiler.reset()
    with torch.no_grad():
        torch.compile(model, backend=recorder, dynamic=False)(*example_args, **example_kwargs)
    torch.compiler.reset()  # drop the recorder's cache entries: a later compile must not reuse them
    report = ExplainReport(graphs, config, approx)
    if dump_dir is not None:
        report.dump(dump_dir)
    if dot_dir is not None:
        report.write_dot(dot_dir)
    return report


__all__ = ["BlockInfo", "ExplainReport", "GraphExplanation", "explain", "explain_graph", "unified_diff"]
