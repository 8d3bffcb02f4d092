"""Decision heat map: which block was approximated at which step, and how close each call was.

    st = fastcache_fx.stats(model)
    decision_heatmap(st, "decisions.png")

Rows are blocks (graph order), columns are the steps of one context (classifier-free guidance
pipelines that call the transformer twice per step keep one trace per context). The colour is
delta / threshold (the block's relative input change divided by the bound it was compared
with): below 1 the chi-square test allowed an approximation; warm-up steps and the
``max_consecutive_approx`` limit can still force a full computation, so approximated cells are
marked with a dot.
"""

from __future__ import annotations

import os

import numpy as np

RATIO_MAX = 2.0  # colour scale of delta / threshold: [0, RATIO_MAX], larger values clipped


def _columns(trace: list[dict], context) -> tuple[list[dict], list[list[dict]]]:
    """The chosen context's trace entries grouped into steps (columns).

    A model split by graph breaks records one entry per graph per call: consecutive entries
    whose blocks do not overlap belong to the same call.
    """
    entries = [t for t in trace if t.get("context") == context]
    cols: list[list[dict]] = []
    seen: set[str] = set()
    for t in entries:
        if not cols or seen & set(t["blocks"]):
            cols.append([])
            seen = set()
        cols[-1].append(t)
        seen |= set(t["blocks"])
    return entries, cols


def decision_matrices(stats: dict, context=None) -> dict:
    """The arrays behind the heat map (no drawing).

    Args:
        stats: ``fastcache_fx.stats(model)`` (uses ``trace``; ``blocks`` gives the row order).
        context: which context's steps; None: the context of the first trace entry.

    Returns:
        dict with ``blocks`` (row names), ``steps`` (trajectory step index per column),
        ``context``, ``ratio`` [n_blocks, n_steps] delta / threshold clipped to [0, RATIO_MAX]
        (NaN where a block did not run or delta was not finite: first step, empty anchor),
        ``approx`` [n_blocks, n_steps] bool, ``covered`` [n_blocks, n_steps] bool (the block ran), ``tokens`` None or [n_steps] / [n_blocks, n_steps]
        float (from the optional per-entry ``tokens`` key: one count per step or per block).

    Raises:
        ValueError: an empty trace, or ``context`` not in it.
    """
    trace = stats.get("trace") or []
    if not trace:
        raise ValueError("stats: the trace is empty (run the compiled model first)")
    contexts = list(dict.fromkeys(t.get("context") for t in trace))
    context = contexts[0] if context is None else context
    if context not in contexts:
        raise ValueError(f"context: {context!r} not in the trace (contexts: {contexts})")
    entries, cols = _columns(trace, context)
    blocks = list(stats.get("blocks") or [])
    for t in entries:
        blocks += [b for b in t["blocks"] if b not in blocks]
    row = {b: i for i, b in enumerate(blocks)}
    shape = (len(blocks), len(cols))
    delta = np.full(shape, np.nan)
    thr = np.full(shape, np.nan)
    approx = np.zeros(shape, dtype=bool)
    covered = np.zeros(shape, dtype=bool)
    tokens = None
    has_tokens = any("tokens" in t for t in entries)
    for j, col in enumerate(cols):
        for t in col:
            rows = [row[b] for b in t["blocks"]]
            delta[rows, j] = t["delta"]
            thr[rows, j] = t["threshold"]
            approx[rows, j] = t["approx"]
            covered[rows, j] = True
            # the step / span levels' front and back blocks: computed every step, outside any cond
            covered[[row[b] for b in t.get("computed", ()) if b in row], j] = True
            if has_tokens and "tokens" in t:
                tok = np.asarray(t["tokens"], dtype=float)
                if tokens is None:
                    tokens = np.full(shape if tok.ndim else (shape[1],), np.nan)
                if tok.ndim and tokens.ndim == 2:
                    tokens[rows, j] = tok
                elif tokens.ndim == 1:
                    tokens[j] = tok.sum() if tok.ndim else tok
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(thr > 0, delta / thr, np.where(delta > 0, np.inf, 0.0))
    # a non-finite delta means "no anchor yet" (first step) or NaN inputs: shown as not evaluated
    ratio = np.where(np.isfinite(delta), np.clip(ratio, 0.0, RATIO_MAX), np.nan)
    steps = [int(col[0].get("step", j)) for j, col in enumerate(cols)]
    return {"blocks": blocks, "steps": steps, "context": context, "ratio": ratio, "approx": approx,
            "covered": covered, "tokens": tokens}


def decision_heatmap(stats: dict, path: str | os.PathLike, context=None, title: str | None = None) -> np.ndarray:
    """Draw the blocks x steps decision heat map of ``stats`` into ``path`` (PNG, PDF, SVG...).

    Colour: delta / threshold on a linear [0, RATIO_MAX] scale (blue: far below the bound,
    white: at the bound, red: above; grey: not evaluated); a black dot marks an approximated
    cell. When the trace entries carry ``tokens`` a second panel shows the token counts per
    step (a line) or per block and step (an image).

    Args:
        stats: ``fastcache_fx.stats(model)``.
        path: output file (matplotlib picks the format from the suffix).
        context: which context's steps; None: the first one in the trace.

    Returns:
        the drawn ratio array [n_blocks, n_steps] (float, NaN where not evaluated).

    Raises:
        ValueError: empty trace or unknown context.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = decision_matrices(stats, context)
    ratio, approx, tokens = m["ratio"], m["approx"], m["tokens"]
    nb, ns = ratio.shape
    panels = 2 if tokens is not None else 1
    fig_w = min(6 + 0.25 * ns, 24)
    fig_h = min(1.5 + 0.3 * nb, 14) * (1.6 if panels == 2 else 1)
    fig, axes = plt.subplots(panels, 1, figsize=(fig_w, fig_h), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]} if panels == 2 else None)
    ax = axes[0, 0]
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    im = ax.imshow(np.ma.masked_invalid(ratio), cmap=cmap, vmin=0.0, vmax=RATIO_MAX, aspect="auto",
                   interpolation="nearest")
    rr, cc = np.nonzero(approx)
    ax.scatter(cc, rr, s=max(4.0, 60.0 / max(1.0, np.sqrt(nb * ns / 50))), c="black", marker="o",
               label="approximated")
    ax.set_yticks(range(nb), m["blocks"], fontsize=7)
    tick = max(1, ns // 20)
    ax.set_xticks(range(0, ns, tick), [str(s) for s in m["steps"][::tick]], fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("block")
    rate = approx.sum() / max(1, m["covered"].sum())
    ax.set_title(title or f"fastcache decisions, context {m['context']!r}\n{approx.sum()} of {m['covered'].sum()} "
                          f"block-steps approximated ({rate:.0%}); dot: approximated", fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02)
    cb.set_label("delta / threshold", fontsize=8)
    if tokens is not None:
        ax2 = axes[1, 0]
        if tokens.ndim == 2:
            im2 = ax2.imshow(np.ma.masked_invalid(tokens), aspect="auto", interpolation="nearest", cmap="viridis")
            ax2.set_yticks(range(nb), m["blocks"], fontsize=7)
            fig.colorbar(im2, ax=ax2, fraction=0.03, pad=0.02).set_label("tokens computed", fontsize=8)
        else:
            ax2.plot(range(ns), tokens, marker=".")
            ax2.set_xlim(-0.5, ns - 0.5)
            ax2.set_ylabel("tokens")
        ax2.set_xticks(range(0, ns, tick), [str(s) for s in m["steps"][::tick]], fontsize=7)
        ax2.set_xlabel("step")
        ax2.set_title("tokens per step", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ratio
