"""Group block regions into spans: the step and span cache levels (``FastCacheConfig.cache_level``).

A span is a run of consecutive blocks (with the glue between them that depends on them) treated
as one block region: one ``torch.cond``, one decision on the change of the span's input, one
anchor input and one anchor residual per stream, whatever its depth. The block-cache pass then
rewrites spans exactly as it rewrites blocks, so every decision rule and approximation kind
(residual reuse, the Taylor forecast of the span's residual) applies to a span unchanged.

- ``cache_level="step"``: the first ``front_blocks`` blocks are always computed, the last
  ``back_blocks`` too, and everything between is one span: one decision per step, on the change
  of the front blocks' output, as FirstBlockCache (diffusers, ``hooks/first_block_cache.py``)
  and DBCache's Fn/Bn split (cache-dit) decide; when it passes, the whole remaining stack is
  approximated at once.
- ``cache_level="span"``: the same front and back blocks; the middle is cut into ``num_spans``
  spans of (nearly) equal depth, each with its own decision.

Pure: the regions are described with ``gm``'s nodes and ``gm`` is not modified.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import fx

from .blocks import BlockRegion, analyse_region, external_inputs, shape_arithmetic


@dataclass
class SpanResult:
    """What ``group_spans`` did.

    ``regions``: the regions to rewrite (spans, or the blocks unchanged at ``cache_level="block"``);
    ``sizes``: blocks per region; ``uncached``: names of the front and back blocks computed every
    step outside any cond; ``reason``: why a span could not be formed (the blocks of that span were
    then kept as separate regions), or ""."""

    regions: list[BlockRegion]
    sizes: list[int]
    uncached: list[str] = field(default_factory=list)
    reason: str = ""


def span_bounds(n: int, config) -> list[tuple[int, int]]:
    """[start, stop) block indices of each span for ``n`` block regions (empty when the front and
    back blocks leave none): ``config.span_sizes`` where they add up to the blocks between the front
    and back blocks, else ``num_spans`` (1 at the step level) spans of equal depth."""
    lo, hi = min(config.front_blocks, n), max(min(config.front_blocks, n), n - config.back_blocks)
    if hi <= lo:
        return []
    if config.span_sizes and sum(config.span_sizes) == hi - lo:  # only set at the span level (config)
        cuts = list(itertools.accumulate(config.span_sizes, initial=lo))
        return list(zip(cuts, cuts[1:]))
    k = 1 if config.cache_level == "step" else min(config.num_spans, hi - lo)
    cuts = [lo + (i * (hi - lo) + k // 2) // k for i in range(k + 1)]  # rounded half up
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def span_name(blocks: list[BlockRegion]) -> str:
    """``transformer_blocks.1-7`` (one list) or ``transformer_blocks.1-single_transformer_blocks.37``."""
    a, b = blocks[0], blocks[-1]
    if len(blocks) == 1:
        return a.name
    return f"{a.name}-{b.index}" if a.list_name == b.list_name else f"{a.name}-{b.name}"


def merge_regions(gm: fx.GraphModule, blocks: list[BlockRegion], others: list[BlockRegion]) -> BlockRegion | str:
    """One region made of consecutive ``blocks`` and the glue between them that depends on them
    (ControlNet residual adds, glue between two block lists); glue between them that
    does not (a context computed late) stays outside, as a context input of the span.

    ``others``: the graph's other regions (their inputs are not the span's own streams).

    Returns:
        the span's BlockRegion, or why it cannot be one (its outputs are not streams of the
        shape of its inputs, it is not convex, or, across block lists, an inner block's output is
        read after the span).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    core = {n for b in blocks for n in b.nodes}
    first, last = min(order[n] for n in core), max(order[n] for n in core)
    members = set(core)
    for n in gm.graph.nodes:
        if first < order[n] < last and n not in members and n.op.startswith("call_") \
                and not shape_arithmetic(n) and any(a in members for a in n.all_input_nodes):
            members.add(n)
    nodes = [n for n in gm.graph.nodes if n in members]
    name = span_name(blocks)
    consumers: dict[fx.Node, set[str]] = {}
    for r in others:
        for a in external_inputs(r.nodes, set(r.nodes)):
            consumers.setdefault(a, set()).add(r.name)
    for a in external_inputs(nodes, members):
        consumers.setdefault(a, set()).add(name)
    reason, region = analyse_region(name, blocks[0].list_name, blocks[0].index, blocks[0].module_type, nodes, consumers)
    if region is not None and len({b.list_name for b in blocks}) > 1:
        # across lists, an inner block whose output the glue reads after the span (Wan VACE's hint,
        # added after the main block) would leave through the span's residual: one span per list
        inner = {n for b in blocks[:-1] for n in b.nodes}
        leaving = [o.name for o in region.stream_outputs if o in inner]
        if leaving:
            return f"span {name}: inner blocks' outputs {leaving} are read after the span"
    return region if region is not None else f"span {name}: {reason}"


def group_spans(gm: fx.GraphModule, regions: list[BlockRegion], config) -> SpanResult:
    """The regions ``apply_block_cache`` rewrites at ``config.cache_level``.

    "block": ``regions`` unchanged. "step" / "span": the front and back blocks left out (computed
    every step) and the rest merged into spans (``span_bounds``, ``merge_regions``). A span that
    cannot be formed over two block lists is tried per list; failing that its blocks stay separate
    regions (``SpanResult.reason`` says why)."""
    if config.cache_level == "block" or not regions:
        return SpanResult(list(regions), [1] * len(regions))
    bounds = span_bounds(len(regions), config)
    if not bounds:
        return SpanResult([], [], [r.name for r in regions],
                          f"front_blocks={config.front_blocks} and back_blocks={config.back_blocks} leave no block "
                          f"to cache among {len(regions)}")
    covered = {i for a, b in bounds for i in range(a, b)}
    out = SpanResult([], [], [r.name for i, r in enumerate(regions) if i not in covered])
    if config.span_sizes and tuple(b - a for a, b in bounds) != config.span_sizes:
        out.reason = (f"span_sizes={config.span_sizes} add up to {sum(config.span_sizes)}, the blocks between the "
                      f"front and back blocks are {len(covered)}: spans of equal depth used")
    for a, b in bounds:
        for region, size, why in _spans_of(gm, regions[a:b], regions):
            out.regions.append(region)
            out.sizes.append(size)
            out.reason = out.reason or why
    return out


def _spans_of(gm: fx.GraphModule, part: list[BlockRegion], regions: list[BlockRegion]) -> list[tuple]:
    """(region, blocks in it, why it is not the whole span) for one span: the span whole; else,
    when it crosses block lists, one span per list; else its blocks as they are."""
    span = merge_regions(gm, part, [r for r in regions if all(r is not p for p in part)])
    if not isinstance(span, str):
        return [(span, len(part), "")]
    lists = list(dict.fromkeys(r.list_name for r in part))
    if len(lists) > 1:
        out = []
        for name in lists:
            out += _spans_of(gm, [r for r in part if r.list_name == name], regions)
        return [(r, n, why or f"{span}; one span per block list") for r, n, why in out]
    return [(r, 1, f"{span}; its blocks are cached one by one") for r in part]
