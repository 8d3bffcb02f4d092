"""Statistics of a model's compiled graphs, computed from the lazily kept step trace.

Everything describes the calls since the last ``reset()`` of the model (``reset`` clears the
statistics with the cache); ``trajectory`` narrows it to the current trajectory of each context.
"""

from __future__ import annotations

from .registry import ModelEntry


def _empty() -> dict:
    return {"block_approx_ratio": 0.0, "per_block": {}, "steps": 0, "blocks": [], "graphs": 0, "per_graph": [],
            "fallback": [], "notes": [], "uncompiled_calls": 0, "state_bytes": 0, "state_bytes_per_block": {},
            "state_bytes_per_context": {}, "trajectory": {}, "trace": [], "token_merge": None, "spatial_approx_ratio": 0.0, "token_select": None}


def collect(entry: ModelEntry | None) -> dict:
    """Aggregate every graph compiled for a model.

    Returns:
        dict with
        ``block_approx_ratio``: approximated / evaluated block-steps over all graphs; a graph
        compiled without the cache (``fallback``) counts each call as computing its blocks fully;
        ``per_block`` {block name: ratio}; ``steps``: calls of all graphs; ``blocks``: names in
        graph order; ``graphs``: number of compiled graphs (fallbacks included);
        ``per_graph``: one dict per graph: ``kind`` ("fastcache", "token_select", "regional" (block
        graphs), "glue" (a graph without blocks of a model whose other graphs carry the cache:
        Dynamo split it at graph breaks) or "fallback"),
        ``fallback`` (the reason, or None), ``dynamic`` (traced with symbolic shapes, serving many
        shapes), ``blocks``, ``cache_level`` and ``conds_per_step`` (the conds each call of the graph
        evaluates: one per block, or per span), ``streams`` (residual streams per block, e.g. 2 for a joint
        text-image block; empty where the graph has no block cache), ``steps``, ``block_approx_ratio``, ``state_bytes``;
        ``fallback``: the reasons of the fallback graphs, and a line for the calls Dynamo ran
        uncompiled (``enable_fastcache`` models: ``runtime.uncompiled``); ``uncompiled_calls``:
        those calls; ``notes``: why graphs were served otherwise than asked (a step or span
        cache level on block graphs Dynamo split off, served at the block level; a graph the
        backend could not rewrite, compiled with plain Inductor), one line each; ``state_bytes``: bytes of live cache
        state (all graphs and contexts), ``state_bytes_per_block`` {block name: bytes} (the
        trajectory counters under ``""``); ``state_bytes_per_context`` {CFG context: bytes} (whole-graph
        runtimes);
        ``trajectory``: {context: {"steps", "block_approx_ratio"}} of the current trajectory of
        each context (the steps since its last step 0);
        ``trace``: one dict per step with ``context``, ``step`` (index in its trajectory),
        ``blocks``, ``approx`` [L] bools, ``delta`` [L] and ``threshold`` [L] (the bound on delta),
        and under ``decision="output"`` ``output_error``, the step's predicted relative output
        error (``ops.output_error``); at the step and span levels ``sizes`` (blocks per span),
        ``uncached`` and ``computed`` (the count and names of the front / back blocks computed every step);
        ``token_merge``: for the last graph with the token-merge pyramid, ``{"stages": block
        names per stage, "tokens_per_stage": tokens per sample, "grid": (h, w), "window": (wh, ww)}``,
        else None;
        ``spatial_approx_ratio``: approximated / all image token-steps of token selection (0.0
        without it); ``token_select``: ``{"buckets", "variants_compiled", "spatial_approx_ratio",
        "static_approx" (the one built: "cached" when the stack map was missing), "steps":
        [{"context", "step", "k" computed tokens, "n", "m" motion tokens}]}`` summed
        over the model's token-selection graphs, else None.
    """
    if entry is None or not entry.graphs:
        return dict(_empty(), **_uncompiled(entry))
    counts, totals, blocks, per_graph = {}, {}, [], []
    bytes_per_block: dict[str, int] = {}
    per_context: dict[str, int] = {}
    records = []
    for g in entry.graphs:
        per_graph.append(_graph_row(g, blocks, counts, totals, bytes_per_block, records, per_context))
    trace = [r for _, r in sorted(records, key=lambda x: x[0])]
    total = sum(totals.values())
    return {
        "block_approx_ratio": (sum(counts.values()) / total) if total else 0.0,
        "per_block": {n: counts.get(n, 0) / totals[n] for n in blocks if totals.get(n)},
        "steps": sum(g.calls for g in entry.graphs),
        "blocks": blocks,
        "graphs": len(entry.graphs),
        "per_graph": per_graph,
        "fallback": [g.fallback for g in entry.graphs if g.fallback is not None] + _uncompiled(entry)["fallback"],
        "notes": list(dict.fromkeys(n for g in entry.graphs for n in (getattr(g, "notes", None) or []))),
        "uncompiled_calls": entry.uncompiled_calls,
        "state_bytes": sum(bytes_per_block.values()),
        "state_bytes_per_block": bytes_per_block,
        "state_bytes_per_context": per_context,
        "trajectory": _trajectories(trace),
        "token_merge": _token_merge(entry),
        **_token_select(entry),
        "trace": trace,
    }


def _graph_row(g, blocks: list, counts: dict, totals: dict, bytes_per_block: dict, records: list,
               per_context: dict) -> dict:
    """One graph's ``per_graph`` row; adds its blocks, decision counts, state bytes and trace
    records to the model-wide accumulators."""
    names = g.blocks
    layout = getattr(g, "layout", None)
    # a span counts as the blocks it holds; the step and span levels' front / back blocks as
    # blocks computed every step
    sizes = list(getattr(layout, "sizes", None) or [1] * len(names))
    uncached = list(getattr(layout, "uncached", None) or [])
    for n in uncached + names:
        if n not in blocks:
            blocks.append(n)
    done = approx_n = 0
    if g.fallback is not None:  # every call computed every block
        for n in names:
            totals[n] = totals.get(n, 0) + g.calls
        done = g.calls * len(names)
    own = []
    for rec in g.trace:
        approx = [bool(x) for x in rec.approx.tolist()]
        own.append({"context": rec.context, "step": int(rec.step), "blocks": names, "approx": approx,
                    "delta": [float(x) for x in rec.delta.tolist()],
                    "threshold": [float(x) for x in rec.threshold.tolist()],
                    **({} if rec.output_error is None else {"output_error": float(rec.output_error)}),
                    **({"sizes": sizes, "uncached": len(uncached), "computed": uncached}
                       if uncached or set(sizes) != {1} else {})})
        records.append((rec.seq, own[-1]))
        for n, a, k in zip(names + uncached, approx + [False] * len(uncached), sizes + [1] * len(uncached)):
            counts[n] = counts.get(n, 0) + int(a) * k
            totals[n] = totals.get(n, 0) + k
    a, n = block_counts(own)
    approx_n, done = approx_n + a, done + n
    for ctx, st in (getattr(g, "states", None) or {}).items():
        if isinstance(st, list):
            per_context[ctx] = per_context.get(ctx, 0) + sum(t.numel() * t.element_size() for t in st)
    gb = g.state_bytes()
    for b, n in gb.items():
        bytes_per_block[b] = bytes_per_block.get(b, 0) + n
    return {"kind": g.kind, "fallback": g.fallback, "dynamic": g.dynamic, "blocks": list(names),
            "cache_level": getattr(layout, "level", None), "conds_per_step": len(names) if layout is not None else 0,
            "streams": [len(x) for x in getattr(layout, "stream_shapes", [])],
            "steps": g.calls, "block_approx_ratio": approx_n / done if done else 0.0,
            "state_bytes": sum(gb.values())}


def _uncompiled(entry: ModelEntry | None) -> dict:
    """``uncompiled_calls`` and, when there were any, their reason as a ``fallback`` line."""
    if entry is None or not entry.uncompiled_calls:
        return {"uncompiled_calls": 0, "fallback": []}
    return {"uncompiled_calls": entry.uncompiled_calls,
            "fallback": [f"ran uncompiled ({entry.uncompiled_calls} calls): {entry.uncompiled_reason}"]}


def block_counts(records: list[dict]) -> tuple[int, int]:
    """(approximated, all) block computations of ``stats()["trace"]`` records: a span counts the
    blocks it holds (``sizes``), the step and span levels' front / back blocks count as computed
    (``uncached``)."""
    approx = total = 0
    for r in records:
        sizes = r.get("sizes") or [1] * len(r["approx"])
        approx += sum(k for a, k in zip(r["approx"], sizes) if a)
        total += sum(sizes) + r.get("uncached", 0)
    return approx, total


def block_share(records: list[dict]) -> float:
    """Approximated / all block computations of ``stats()["trace"]`` records (``block_counts``); 0.0
    for none."""
    a, n = block_counts(records)
    return a / n if n else 0.0


def _trajectories(trace: list[dict]) -> dict:
    """{context: steps and approximated share of the block-steps since its last step 0}. A model
    split by graph breaks has several graphs with blocks, each counting the same steps: each
    graph's current trajectory is taken on its own, steps are the longest of them."""
    cur: dict[tuple, list[dict]] = {}
    for t in trace:
        key = (t["context"], tuple(t["blocks"]))
        if t["step"] == 0:
            cur[key] = []
        cur.setdefault(key, []).append(t)
    out: dict[str, dict] = {}
    for (ctx, _), recs in cur.items():
        o = out.setdefault(ctx, {"steps": 0, "approx": 0, "n": 0})
        o["steps"] = max(o["steps"], len(recs))
        a, n = block_counts(recs)
        o["approx"] += a
        o["n"] += n
    return {ctx: {"steps": o["steps"], "block_approx_ratio": o["approx"] / o["n"] if o["n"] else 0.0}
            for ctx, o in out.items()}


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
