"""Statistics of a model's compiled graphs, computed from the lazily kept step trace.

Everything describes the calls since the last ``reset()`` of the model (``reset`` clears the
statistics with the cache) that the bounded trace still holds (``FastCacheConfig.trace_steps``,
``trace_requests``); ``trajectory`` narrows it to the current trajectory of each context of the
latest request, ``requests`` splits it by request (``runtime.requests``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from .registry import ModelEntry
from .requests import end_finished


@dataclass(eq=False)
class Stats(Mapping):
    """What ``fastcache_fx.stats(model)`` returns: the decisions of every graph compiled for a
    model since its last ``reset()``. Read the fields as attributes (``st.block_approx_ratio``) or,
    as before this class, as keys (``st["block_approx_ratio"]``, ``st.get``, ``st.keys()``,
    ``{**st}``; it compares equal to a dict of the same items); ``to_dict()`` gives a plain dict.

    Attributes:
        block_approx_ratio: approximated / evaluated block-steps over all graphs; a graph compiled
            without the cache (``fallback``) counts each call as computing its blocks fully.
        per_block: {block name: ratio}.
        steps: calls of all graphs.
        blocks: block names in graph order.
        graphs: number of compiled graphs (fallbacks included).
        per_graph: one dict per graph: ``kind`` ("fastcache", "token_select", "regional" (block
            graphs), "glue" (a graph without blocks of a model whose other graphs carry the cache:
            Dynamo split it at graph breaks) or "fallback"), ``fallback`` (the reason, or None),
            ``dynamic`` (traced with symbolic shapes, serving many shapes), ``blocks``,
            ``cache_level`` and ``conds_per_step`` (the conds each call of the graph evaluates: one
            per block, or per span), ``streams`` (residual streams per block, e.g. 2 for a joint
            text-image block; empty where the graph has no block cache), ``steps``,
            ``block_approx_ratio``, ``state_bytes``.
        fallback: the reasons of the fallback graphs, and a line for the calls Dynamo ran
            uncompiled (``enable_fastcache`` models: ``runtime.uncompiled``).
        uncompiled_calls: those calls.
        not_approximated: {block or span: why} for those never approximated over the trace
            although they were decided on at later steps, where the reason is known: today, a
            block whose stream input never changed while it was computed (``STILL_INPUT``).
        notes: why graphs were served otherwise than asked (a step or span cache level on block
            graphs Dynamo split off, served at the block level; a graph the backend could not
            rewrite, compiled with plain Inductor), one line each.
        state_bytes: bytes of live cache state (all graphs and contexts).
        state_bytes_per_block: {block name: bytes} (the trajectory counters under ``""``).
        state_bytes_per_context: {CFG context: bytes} (whole-graph runtimes).
        trajectory: {context: {"steps", "block_approx_ratio"}} of the current trajectory of each
            context of the latest request (the steps since its last step 0).
        requests: {request id: {"calls", "contexts", "block_approx_ratio", "evicted" (steps that
            started afresh because the bound on live requests had dropped the state), "live"
            (holds state now), "state_bytes" (now if live, else what it held when it ended)}} for
            the requests the trace holds (docs/serving.md).
        live_requests: requests holding state now.
        evictions: (request, context) states dropped by ``max_live_requests`` so far.
        last_request: the latest request's entry, with its ``id`` (None before any call).
        quality: with ``enable_fastcache(..., target_psnr=...)`` whole-graph,
            ``runtime.quality.QualityTarget.describe()`` (target, whether the sampler is known, the
            trajectory's predicted final error), else None.
        trace: one dict per step with ``context``, ``request`` (its id), ``evicted``, ``step``
            (index in its trajectory), ``blocks``,
            ``approx`` [L] bools, ``delta`` [L] and ``threshold`` [L] (the bound on delta), and
            under ``decision="output"`` ``output_error``, the step's predicted relative output
            error (``ops.output_error``); at the step and span levels ``sizes`` (blocks per span),
            ``uncached`` and ``computed`` (the count and names of the front / back blocks computed
            every step).
        token_merge: for the last graph with the token-merge pyramid, ``{"stages": block names per
            stage, "tokens_per_stage": tokens per sample, "grid": (h, w), "window": (wh, ww)}``,
            else None.
        spatial_approx_ratio: approximated / all image token-steps of token selection (0.0
            without it).
        token_select: ``{"buckets", "variants_compiled", "spatial_approx_ratio", "static_approx"
            (the one built: "cached" when the stack map was missing), "steps": [{"context", "step",
            "k" computed tokens, "n", "m" motion tokens}]}`` summed over the model's
            token-selection graphs, else None.
    """

    block_approx_ratio: float = 0.0
    per_block: dict = field(default_factory=dict)
    steps: int = 0
    blocks: list = field(default_factory=list)
    graphs: int = 0
    per_graph: list = field(default_factory=list)
    fallback: list = field(default_factory=list)
    not_approximated: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    uncompiled_calls: int = 0
    state_bytes: int = 0
    state_bytes_per_block: dict = field(default_factory=dict)
    state_bytes_per_context: dict = field(default_factory=dict)
    trajectory: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)
    token_merge: dict | None = None
    spatial_approx_ratio: float = 0.0
    token_select: dict | None = None
    requests: dict = field(default_factory=dict)
    live_requests: int = 0
    evictions: int = 0
    last_request: dict | None = None
    quality: dict | None = None

    def __getitem__(self, key: str):
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self):
        return iter(_FIELDS)

    def __len__(self) -> int:
        return len(_FIELDS)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return {k: getattr(self, k) for k in _FIELDS}


_FIELDS = tuple(f.name for f in fields(Stats))


def collect(entry: ModelEntry | None) -> Stats:
    """Aggregate every graph compiled for a model into a ``Stats`` (see its fields)."""
    end_finished()  # requests of threads and tasks that ended: free their state first
    if entry is None or not entry.graphs:
        return Stats(**_uncompiled(entry))
    counts, totals, blocks, per_graph = {}, {}, [], []
    bytes_per_block: dict[str, int] = {}
    per_context: dict[str, int] = {}
    records = []
    for g in entry.graphs:
        per_graph.append(_graph_row(g, blocks, counts, totals, bytes_per_block, records, per_context))
    trace = [r for _, r in sorted(records, key=lambda x: x[0])]
    total = sum(totals.values())
    requests = _requests(entry, trace)
    return Stats(**{
        "block_approx_ratio": (sum(counts.values()) / total) if total else 0.0,
        "per_block": {n: counts.get(n, 0) / totals[n] for n in blocks if totals.get(n)},
        "steps": sum(g.calls for g in entry.graphs),
        "blocks": blocks,
        "graphs": len(entry.graphs),
        "per_graph": per_graph,
        "fallback": [g.fallback for g in entry.graphs if g.fallback is not None] + _uncompiled(entry)["fallback"],
        "not_approximated": not_approximated(trace),
        "notes": list(dict.fromkeys(n for g in entry.graphs for n in (getattr(g, "notes", None) or []))),
        "uncompiled_calls": entry.uncompiled_calls,
        "state_bytes": sum(bytes_per_block.values()),
        "state_bytes_per_block": bytes_per_block,
        "state_bytes_per_context": per_context,
        "trajectory": _trajectories([t for t in trace if t["request"] == trace[-1]["request"]]),
        "requests": requests,
        "live_requests": len(entry.requests.live),
        "evictions": entry.requests.evictions,
        "last_request": {"id": trace[-1]["request"], **requests[trace[-1]["request"]]} if trace else None,
        "quality": entry.quality.describe() if entry.quality is not None else None,
        "token_merge": _token_merge(entry),
        **_token_select(entry),
        "trace": trace,
    })


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
        own.append({"context": rec.context, "request": rec.request, "evicted": rec.evicted,
                    "step": int(rec.step), "blocks": names, "approx": approx,
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
    for key, st in list((getattr(g, "states", None) or {}).items()):
        if isinstance(st, list):
            ctx = key[1] if isinstance(key, tuple) else key  # (request id, context)
            per_context[ctx] = per_context.get(ctx, 0) + sum(t.numel() * t.element_size() for t in st)
    gb = g.state_bytes()
    for b, n in gb.items():
        bytes_per_block[b] = bytes_per_block.get(b, 0) + n
    return {"kind": g.kind, "fallback": g.fallback, "dynamic": g.dynamic, "blocks": list(names),
            "cache_level": getattr(layout, "level", None), "conds_per_step": len(names) if layout is not None else 0,
            "streams": [len(x) for x in getattr(layout, "stream_shapes", [])],
            "steps": g.calls, "block_approx_ratio": approx_n / done if done else 0.0,
            "state_bytes": sum(gb.values())}


#: ``not_approximated``'s reason for a block whose stream input did not change between steps
STILL_INPUT = ("its stream input did not change between steps while the block was computed: its output "
               "moves only with context inputs (the timestep embedding, another stream), which the input "
               "change delta does not see; the output rule bounds a block's error by delta, so it computes "
               "this block fully (the chi-square rule would reuse it)")


def not_approximated(trace: list[dict]) -> dict[str, str]:
    """``stats()["not_approximated"]``: {region: reason} of the regions decided on at steps >= 1
    and never approximated, whose reason is known (``STILL_INPUT``: delta 0 at every such step)."""
    seen: dict[str, list[float]] = {}
    approx: set[str] = set()
    for t in trace:
        for name, a, d in zip(t["blocks"], t["approx"], t["delta"]):
            if a:
                approx.add(name)
            elif t["step"] >= 1:
                seen.setdefault(name, []).append(d)
    return {name: STILL_INPUT for name, ds in seen.items() if name not in approx and all(d == 0.0 for d in ds)}


def _requests(entry: ModelEntry, trace: list[dict]) -> dict:
    """``stats()["requests"]``: the trace's records per request (see ``collect``)."""
    by: dict[str, list[dict]] = {}
    for t in trace:
        by.setdefault(t["request"], []).append(t)
    live = entry.requests
    with live.lock:
        now = {rid: sum(sum(g.state_bytes(rid).values()) for g in entry.graphs) for rid in live.live}
        ended = dict(live.ended)
    out = {}
    for rid, recs in by.items():
        a, n = block_counts(recs)
        out[rid] = {"calls": len(recs), "contexts": sorted({r["context"] for r in recs}),
                    "block_approx_ratio": a / n if n else 0.0, "evicted": sum(r["evicted"] for r in recs),
                    "live": rid in now, "state_bytes": now[rid] if rid in now else ended.get(rid, 0)}
    return out


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
