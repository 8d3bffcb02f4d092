"""Spans chosen from measured per-block errors (``FastCacheConfig.span_sizes``).

After a trajectory at ``cache_level="block"`` under a rule that measures errors (``decision``
"output", the default, or "error"), every block l holds k_l, its measured output error per unit
of input change (``ops.forecast.update_error_estimate``), and the trace holds its input changes
delta_l. e_l = k_l * median(delta_l) is the relative error block l's approximation is expected to
add on a typical step. ``choose_spans`` cuts the blocks between the front and back blocks into
``num_spans`` contiguous spans whose largest summed e_l is as small as it can be: a span's single
decision then never has to carry one block that is much harder to approximate than the others
beside many easy ones.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from . import registry


def balanced_partition(errors: Sequence[float], k: int) -> list[int]:
    """Sizes of ``k`` contiguous groups of ``errors`` (in order) minimising the largest group sum
    (the linear partition problem, dynamic programming in O(k n^2)); ties go to the earliest cut.

    Raises:
        ValueError: k < 1 or k > len(errors)."""
    n = len(errors)
    if not 1 <= k <= n:
        raise ValueError(f"num_spans: expected 1 <= num_spans <= {n} (the blocks to cut), got {k}")
    prefix = [0.0]
    for e in errors:
        prefix.append(prefix[-1] + e)
    # best[j][i]: the smallest largest sum of the first i errors cut into j groups; cut[j][i]: where
    # the last of those groups starts
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i] - 1e-12:
                    best[j][i], cut[j][i] = v, s
    sizes, i = [], n
    for j in range(k, 0, -1):
        sizes.append(i - cut[j][i])
        i = cut[j][i]
    return sizes[::-1]


def block_errors(model) -> dict[str, float]:
    """{block name: e_l} of the block-level graphs of a compiled ``model`` (module, compiled module
    or pipeline): k_l (the mean over CFG contexts of the finite estimates) times the median of the
    block's finite input changes at steps >= 1 of the trace. Blocks without a measurement are left
    out.

    Raises:
        ValueError: no graph of ``model`` keeps per-block error estimates (run one trajectory with
            ``cache_level="block"`` and ``decision`` "output" or "error" first)."""
    entry = registry.lookup(model)
    out: dict[str, float] = {}
    found = False
    for g in (entry.graphs if entry is not None else []):
        layout = getattr(g, "layout", None)
        if layout is None or getattr(layout, "level", "block") != "block" or not getattr(g, "states", None):
            continue
        names = [s.name for s in layout.state]
        for i, block in enumerate(g.blocks):
            key = f"{block}.error_per_delta"
            if key not in names:
                continue
            found = True
            at = names.index(key)
            ks = [float(st[at]) for st in g.states.values() if isinstance(st, list) and math.isfinite(float(st[at]))]
            deltas = [float(r.delta[i]) for r in g.trace if int(r.step) >= 1 and math.isfinite(float(r.delta[i]))]
            if ks and deltas:
                out[block] = statistics.fmean(ks) * statistics.median(deltas)
    if not found:
        raise ValueError("choose_spans: no per-block error estimates; run one trajectory compiled with "
                         "cache_level='block' and decision 'output' (the default) or 'error' first")
    return out


def choose_spans(model, num_spans: int = 2, front_blocks: int = 1, back_blocks: int = 0) -> tuple[int, ...]:
    """``span_sizes`` for ``cache_level="span"`` from the errors measured on ``model`` (see the
    module docstring): the blocks between the first ``front_blocks`` and the last ``back_blocks``
    cut into ``num_spans`` spans of balanced expected error. A block never measured (always
    computed) counts as the largest measured error.

        fastcache_fx.choose_spans(transformer, num_spans=2)  # after one block-level trajectory
        -> (2, 3); then options={"cache_level": "span", "span_sizes": (2, 3)}

    Raises:
        ValueError: no estimates (``block_errors``), or nothing to cut (``balanced_partition``)."""
    errors = block_errors(model)
    blocks = [b for g in registry.lookup(model).graphs for b in g.blocks]
    blocks = list(dict.fromkeys(blocks))
    middle = blocks[front_blocks:len(blocks) - back_blocks]
    worst = max(errors.values(), default=1.0)
    return tuple(balanced_partition([errors.get(b, worst) for b in middle], num_spans))
