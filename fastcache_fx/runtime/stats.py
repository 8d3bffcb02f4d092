"""Statistics of a model's fastcache graphs, computed from the lazily kept step trace."""

from __future__ import annotations

from .registry import ModelEntry


def collect(entry: ModelEntry | None) -> dict:
    """Aggregate every graph of a model.

    Returns:
        dict with ``block_approx_ratio`` (approximated / evaluated block-steps), ``per_block``
        {block name: ratio}, ``steps`` (calls), ``blocks`` (names, graph order), ``graphs``
        (number of compiled fastcache graphs) and ``trace``: one dict per step with
        ``context``, ``step`` (index in its trajectory), ``approx`` [L] bools, ``delta`` [L] and
        ``threshold`` [L] (the relative-change bound delta was compared with).
        ``token_merge``: for the last graph with the token-merge pyramid, ``{"stages": block
        names per stage, "tokens_per_stage": tokens per sample, "grid": (h, w), "window": (wh, ww)}``,
        else None.
        ``spatial_approx_ratio``: approximated / all image token-steps of token selection (0.0
        without it); ``token_select``: ``{"buckets", "variants_compiled", "spatial_approx_ratio",
        "static_approx" (the one built: "cached" when the stack map was missing), "steps":
        [{"context", "step", "k" computed tokens, "n", "m" motion tokens}]}`` summed
        over the model's token-selection graphs, else None.
    """
    empty = {"block_approx_ratio": 0.0, "per_block": {}, "steps": 0, "blocks": [], "graphs": 0, "trace": [],
             "token_merge": None, "spatial_approx_ratio": 0.0, "token_select": None}
    if entry is None or not entry.graphs:
        return empty
    trace, counts, totals, blocks = [], {}, {}, []
    for g in entry.graphs:
        names = g.layout.blocks
        for n in names:
            if n not in blocks:
                blocks.append(n)
        for rec in g.trace:
            approx = [bool(x) for x in rec.approx.tolist()]
            trace.append({"context": rec.context, "step": int(rec.step), "blocks": names, "approx": approx,
                          "delta": [float(x) for x in rec.delta.tolist()],
                          "threshold": [float(x) for x in rec.threshold.tolist()]})
            for n, a in zip(names, approx):
                counts[n] = counts.get(n, 0) + int(a)
                totals[n] = totals.get(n, 0) + 1
    total = sum(totals.values())
    return {
        "block_approx_ratio": (sum(counts.values()) / total) if total else 0.0,
        "per_block": {n: counts.get(n, 0) / totals[n] for n in blocks if totals.get(n)},
        "steps": len(trace),
        "blocks": blocks,
        "graphs": len(entry.graphs),
        "token_merge": _token_merge(entry),
        **_token_select(entry),
        "trace": trace,
    }


def _token_merge(entry: ModelEntry) -> dict | None:
    tm = next((g.token_merge for g in reversed(entry.graphs) if getattr(g, "token_merge", None) is not None), None)
    if tm is None:
        return None
    return {"stages": tm.stages, "tokens_per_stage": list(tm.tokens_per_stage), "grid": tm.grid, "window": tm.window}


def _token_select(entry: ModelEntry) -> dict:
    sums = [g.summary() for g in entry.graphs if hasattr(g, "select_trace")]
    if not sums:
        return {"spatial_approx_ratio": 0.0, "token_select": None}
    steps = [r for s in sums for r in s["steps"]]
    total = sum(r["n"] for r in steps)
    ratio = sum(r["n"] - r["k"] for r in steps) / total if total else 0.0
    return {"spatial_approx_ratio": ratio,
            "token_select": {"buckets": sums[-1]["buckets"], "static_approx": sums[-1].get("static_approx", "cached"),
                             "variants_compiled": sum(s["variants_compiled"] for s in sums),
                             "spatial_approx_ratio": ratio, "steps": steps}}
