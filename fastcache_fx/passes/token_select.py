"""Motion-aware token selection (FastCache sec. 3.1, "spatial" half) as a pure graph pass with static shapes.

Only the motion tokens run through the block stack; the static tokens get an approximation of
their stack output. ``apply_token_select(gm, config, k)`` builds the variant that computes k
image tokens (k from ``token_buckets``); the runtime (``runtime/token_select.py``) picks the
variant of the next step, so every variant has static shapes and is compiled once at most.

Saliency. With X_t [B, N, D] the image stream entering the first block and X_ref its reference
state (``reference="anchor"``: each token's input when it was last computed; ``"previous"``: the
previous step's input, the paper's rule), per sample b and token i

    S_b[i] = ||X_t[b, i] - X_ref[b, i]||^2 / mean_j ||X_ref[b, j]||^2

a unitless relative change (the paper thresholds the absolute ||X_t - X_{t-1}||^2, whose scale
depends on the model and the timestep). The token saliency is s[i] = max_b S_b[i]: one token set
for the whole batch, because token-indexed context inputs (Flux's rotary embedding
[N_txt + N_img, d]) have no batch dimension. The motion tokens are the top-k of s (sorted by
index); m = #{i : s[i] > motion_threshold} is returned for the runtime to choose the next
step's bucket. Text tokens of joint models (SD3, Flux) are never selected: they always run.

Motion tokens attend only among themselves (and the text tokens), as in the paper: the static
tokens are absent from the block stack's attention. Their output is the approximation
``static_approx`` (``approx_static``), with S the static tokens (the complement of the motion
tokens, N - k of them):
    "cached":        Y[S] = Y_ref[S] (their stack output at the last step they were computed; a
                     100 % step refreshes every token);
    "linear":        Y[S] = X[S] W^T + b (FastCache sec. 3.1, W_static X + b_static);
    "cached_linear": Y[S] = Y_ref[S] + (X[S] - X_ref[S]) W^T + b (the issue's
                     Y_{t-1} + W_s (X_t - X_{t-1}), with X_ref the reference above),
W [D, D], b [D] the block-stack map of the calibration (``calibration.calibrate_stack``,
fitted with the identity-plus-residual prior). Y_ref keeps the *computed* stack outputs of
static tokens under ``reference="anchor"`` (matching X_ref, so Y_ref + W (X - X_ref) never
chains approximations), the approximated ones under ``"previous"``. The motion tokens' outputs
are scattered back in place.

Context inputs indexed by token (a non-batch, non-last dimension of size N_img, or N_txt + N_img
for joint models, text first as in Flux) are gathered with the same indices; they are found by
shape, not by model name. The pass checks that the blocks are token-count generic by fake-tensor
propagation of the gathered shapes: a node that bakes N fails it, and the graph is left alone.

Graph layout added (the block-cache pass then sees these as user inputs/outputs):
    inputs  = original inputs + x_ref [B, N, D], y_ref [B, N, D], step [] int64, prev_t [] f32,
              t_first [] f32 (+ idx_prev [k] int64 when k < N) (+ stack weight [D, D], bias [D] f32 when k < N
              and static_approx is "linear" / "cached_linear": ``TokenSelectResult.weights``)
    outputs = original outputs (as a tuple) + x_ref', y_ref', step', t', t_first', m [] int64
              (+ idx [k] int64 when k < N)
For k < N a node tagged ``meta["fc_token_select"] == "changed"`` says the token set differs
from the previous step of this variant; ``attach_token_select`` (after the block cache) makes it
force full block computations, so a block-cache anchor is never reused for other tokens.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..config import FastCacheConfig
from ..ops.token_select import (approx_static, changed_set, count_motion, force_full_if, gather_tokens, scatter_tokens,
                                select_tokens, update_reference)
from ..contract import TensorSpec, state_spec, weight_spec
from .extra_io import insert_trajectory_step, set_val
from .blocks import BlockRegion, find_blocks, find_timestep, remap_region, tensor_meta
from .graph_utils import clone_graph_module, graph_io, insert_placeholder, node_value, recompile_with_values

# ----------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------

@dataclass
class TokenSelectResult:
    """What ``apply_token_select`` did.

    ``applied`` False (graph unchanged) with ``reason`` when the graph does not fit. ``tokens``
    N (image tokens), ``k`` the tokens this variant computes, ``text_tokens`` the always-kept
    text tokens of a joint model, ``contexts`` the names of the token-indexed context inputs
    gathered. ``state`` are the extra inputs in order (x_ref, y_ref, step, prev_t[, idx_prev]);
    the graph returns user outputs, then their new values, with m [] int64 before idx.
    ``weights`` are the stack-map inputs after them ([D, D] weight, [D] bias; empty unless
    k < N and ``static_approx`` is "linear" / "cached_linear"), never returned.
    """

    applied: bool
    reason: str = ""
    tokens: int = 0
    k: int = 0
    text_tokens: int = 0
    contexts: list[str] = field(default_factory=list)
    stream_shape: tuple = ()
    dtype: torch.dtype = torch.float32
    state: list[TensorSpec] = field(default_factory=list)
    num_user_inputs: int = 0
    num_user_outputs: int = 0
    output_is_tuple: bool = True
    static_approx: str = "cached"
    weights: list[TensorSpec] = field(default_factory=list)


def bucket_sizes(n: int, buckets) -> list[int]:
    """Token counts of the variants: ceil(f N) for f in ``buckets`` (clamped to [1, N]), plus N."""
    return sorted({min(n, max(1, math.ceil(f * n - 1e-9))) for f in buckets} | {n})



def _image_stream(regions: list[BlockRegion]) -> tuple[int, int] | str:
    """(index of the image stream among the first block's stream inputs, index among the last
    block's stream outputs), or a reason why there is no unambiguous one."""
    last = regions[-1]
    outs = [o for o in last.stream_outputs if tensor_meta(o) is not None]
    if len(outs) != 1:
        return f"the last block has {len(last.stream_outputs)} stream outputs (expected one image stream)"
    shape = tensor_meta(outs[0])
    cands = [i for i, x in enumerate(regions[0].stream_inputs) if tensor_meta(x) == shape]
    if len(cands) != 1:
        return "the image stream of the first block is ambiguous (text and image streams have the same shape)"
    return cands[0], last.stream_outputs.index(outs[0])


def image_tokens(regions: list[BlockRegion]) -> int | str:
    """N, the image tokens of the block stack, or why there is no unambiguous image stream."""
    if not regions:
        return "no transformer blocks"
    pick = _image_stream(regions)
    if isinstance(pick, str):
        return pick
    meta = tensor_meta(regions[0].stream_inputs[pick[0]])
    if len(meta[0]) != 3:
        return f"image stream {meta[0]} is not [B, N, D]"
    return int(meta[0][1])


def _token_dim(shape: tuple, sizes: tuple[int, ...]) -> tuple[int, int] | None:
    """(dim, size) of the first token dimension: not the last dim, not dim 0 of a >= 3-D tensor
    (its batch), of a size in ``sizes``."""
    first = 1 if len(shape) >= 3 else 0
    for d in range(first, len(shape) - 1):
        if shape[d] in sizes:
            return d, shape[d]
    return None


def apply_token_select(gm: fx.GraphModule, config: FastCacheConfig, k: int,
                       regions: list[BlockRegion] | None = None,
                       static_approx: str = "cached") -> tuple[fx.GraphModule, TokenSelectResult]:
    """Insert motion-aware token selection computing ``k`` image tokens into a copy of ``gm``.

    k == N gives the 100 % variant: no gather, only the saliency count m and the state. For
    k < N the block stack runs on the top-k tokens by saliency (``select_tokens``) and its output
    is scattered into the static tokens' approximation (``scatter_tokens``). Node
    ``meta["val"]`` of the whole graph is refreshed by fake-tensor propagation, so the block
    cache sizes its state from the gathered shapes.

    ``static_approx`` is the approximation of the static tokens actually built ("cached",
    "linear", "cached_linear"; not ``config.static_approx``, which the runtime downgrades to
    "cached" without a stack map): the last two add the stack-map inputs ``result.weights``.

    Returns:
        (gm', TokenSelectResult); with ``applied`` False gm' is ``gm`` itself and ``reason`` says
        why (no blocks, no unambiguous image stream, a block that is not token-count generic...).
    """
    regions = find_blocks(gm).regions if regions is None else regions
    if not regions:
        return gm, TokenSelectResult(False, "no transformer blocks")
    pick = _image_stream(regions)
    if isinstance(pick, str):
        return gm, TokenSelectResult(False, pick)
    si, so = pick
    (shape, dtype) = tensor_meta(regions[0].stream_inputs[si])
    if len(shape) != 3:
        return gm, TokenSelectResult(False, f"image stream {shape} is not [B, N, D]")
    bsz, n, d = shape
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= {n}, got {k}")
    if static_approx not in ("cached", "linear", "cached_linear"):
        raise ValueError(f"static_approx: expected 'cached', 'linear' or 'cached_linear', got {static_approx!r}")
    others = [tensor_meta(x)[0] for i, x in enumerate(regions[0].stream_inputs) if i != si]
    n_txt = sum(s[1] for s in others if len(s) == 3)
    result = TokenSelectResult(True, "", n, k, n_txt, stream_shape=tuple(shape), dtype=dtype,
                               static_approx=static_approx if k < n else "cached")

    orig_gm = gm
    gm, val_map = clone_graph_module(gm)
    regions = [remap_region(r, val_map) for r in regions]
    graph = gm.graph
    members = set(n_ for r in regions for n_ in r.nodes)
    placeholders, out_node, orig_outs, result.output_is_tuple = graph_io(graph)
    result.num_user_inputs, result.num_user_outputs = len(placeholders), len(orig_outs)

    x_ref_in, y_ref_in, step_in, prev_t_in, first_in, idx_prev_in, w_in, b_in = _state_inputs(graph, placeholders,
                                                                                                 result)
    x = regions[0].stream_inputs[si]
    y = regions[-1].stream_outputs[so]
    ts = find_timestep(placeholders)
    first = regions[0].nodes[0]
    # the trajectory's direction (t_first): rising timesteps (Lumina 2, Z-Image) continue it too
    step_node, t_node, first_node = insert_trajectory_step(graph, first, ts, prev_t_in, step_in, first_in)
    idx, m, xg = _select(graph, first, x, x_ref_in, idx_prev_in, step_node, k, n, config.motion_threshold)
    new_state = []
    if k < n:
        x.replace_all_uses_with(xg, delete_user_cb=lambda u: u in members)
        _gather_contexts(graph, regions, members, idx, result)
        x_new, y_new = _scatter_output(graph, out_node, x, y, members, idx, x_ref_in, y_ref_in, w_in, b_in,
                                       result.static_approx, config.reference == "anchor")
        new_state = [x_new, y_new, step_node, t_node, first_node, m, idx]
    else:
        with graph.inserting_before(out_node):
            x_new = graph.call_function(torch.Tensor.contiguous, (x,))
            y_new = graph.call_function(torch.Tensor.contiguous, (y,))
        new_state = [x_new, y_new, step_node, t_node, first_node, m]
    out_node.args = (tuple(orig_outs) + tuple(new_state),)
    why = recompile_with_values(gm)
    if why is not None:
        return orig_gm, TokenSelectResult(False, f"blocks are not token-count generic: {why}")
    if k < n:
        got = tensor_meta(y)
        if got is None or got[0][1] != k:
            return orig_gm, TokenSelectResult(False, f"{regions[-1].name} output keeps {got and got[0][1]} tokens "
                                                     f"after selecting {k}")
    return gm, result


def _select(graph: fx.Graph, first: fx.Node, x, x_ref_in, idx_prev_in, step_node, k: int, n: int,
            threshold: float) -> tuple:
    """Before the first block: (indices [k], motion count m [], gathered stream) for k < N, or
    (None, m, None) for the 100 % variant (only the count)."""
    with graph.inserting_before(first):
        if k == n:
            return None, graph.call_function(count_motion, (x, x_ref_in, step_node), {"threshold": threshold}), None
        sel = graph.call_function(select_tokens, (x, x_ref_in, step_node), {"k": k, "threshold": threshold})
        idx = graph.call_function(operator.getitem, (sel, 0))
        m = graph.call_function(operator.getitem, (sel, 1))
        changed = graph.call_function(changed_set, (idx, idx_prev_in))
        changed.meta["fc_token_select"] = "changed"
        return idx, m, graph.call_function(gather_tokens, (x, idx))


def _state_inputs(graph: fx.Graph, placeholders: list[fx.Node], result: TokenSelectResult) -> tuple:
    """The variant's state inputs (X_ref, Y_ref, step, prev_t, t_first, the previous indices for k < N)
    and, with a stack map, its weight and bias (None otherwise), registered in ``result``."""
    shape, dtype, k, n = result.stream_shape, result.dtype, result.k, result.tokens
    d = shape[-1]
    last_ph = placeholders[-1]

    def state_input(name: str, shp: tuple, dt: torch.dtype, fill: float) -> fx.Node:
        nonlocal last_ph
        p = last_ph = insert_placeholder(graph, last_ph, "fc_ts_" + name, torch.empty(shp, dtype=dt, device="meta"))
        result.state.append(state_spec("token_select." + name, shp, dt, fill))
        return p

    x_ref_in = state_input("x_ref", shape, dtype, 0.0)
    y_ref_in = state_input("y_ref", shape, dtype, 0.0)
    step_in = state_input("step", (), torch.int64, -1)
    prev_t_in = state_input("prev_t", (), torch.float32, float("-inf"))
    first_in = state_input("t_first", (), torch.float32, float("nan"))
    idx_prev_in = state_input("idx_prev", (k,), torch.int64, -1) if k < n else None
    w_in = b_in = None
    if result.static_approx != "cached":  # the stack map, after the state inputs
        stack_in = []
        for key, shp in (("weight", (d, d)), ("bias", (d,))):
            p = last_ph = insert_placeholder(graph, last_ph, "fc_ts_stack_" + key,
                                             torch.empty(shp, dtype=torch.float32, device="meta"))
            stack_in.append(p)
            result.weights.append(weight_spec("token_select.stack." + key, "stack", 0, key, shp, torch.float32))
        w_in, b_in = stack_in
    return x_ref_in, y_ref_in, step_in, prev_t_in, first_in, idx_prev_in, w_in, b_in


def _scatter_output(graph: fx.Graph, out_node: fx.Node, x, y, members: set, idx, x_ref_in, y_ref_in, w_in, b_in,
                    mode: str, anchor: bool) -> tuple[fx.Node, fx.Node]:
    """Scatter the k computed tokens of the stack output ``y`` into the static tokens'
    approximation (``approx_static`` with a stack map, else Y_ref) for the glue after the stack;
    returns the new (X_ref, Y_ref) nodes."""
    glue_users = [u for u in y.users if u not in members]
    base = y_ref_in
    if w_in is not None:
        with graph.inserting_after(y):
            base = graph.call_function(approx_static, (x, x_ref_in, y_ref_in, idx, w_in, b_in), {"mode": mode})
    with graph.inserting_after(base if w_in is not None else y):
        yfull = y_new = graph.call_function(scatter_tokens, (base, idx, y))
    if w_in is not None:  # Y_ref: computed outputs under "anchor" (matching X_ref), else Y
        with graph.inserting_after(yfull):
            y_new = graph.call_function(scatter_tokens, (y_ref_in, idx, y)) if anchor else yfull
    for u in glue_users:
        u.replace_input_with(y, yfull)
    with graph.inserting_before(out_node):
        x_new = graph.call_function(update_reference, (x, x_ref_in, idx, anchor))
    return x_new, y_new


def _gather_contexts(graph: fx.Graph, regions: list[BlockRegion], members: set, idx: fx.Node,
                     result: TokenSelectResult) -> None:
    """Gather the token-indexed context inputs with the selected indices ``idx`` before their
    first use in a block, and re-bake the token counts the blocks were traced with (N -> k)."""
    n, k, n_txt = result.tokens, result.k, result.text_tokens
    order = {nd: i for i, nd in enumerate(graph.nodes)}
    contexts = list(dict.fromkeys(c for r in regions for c in r.context_inputs))
    sizes = (n, n + n_txt) if n_txt else (n,)
    for c in contexts:
        meta = tensor_meta(c)
        td = _token_dim(meta[0], sizes) if meta else None
        if td is None:
            continue
        dim, size = td
        users = sorted((u for u in c.users if u in members), key=order.__getitem__)
        if not users:
            continue
        with graph.inserting_before(users[0]):
            cg = graph.call_function(gather_tokens, (c, idx), {"dim": dim, "offset": size - n})
        c.replace_all_uses_with(cg, delete_user_cb=lambda u: u in members)
        result.contexts.append(c.name)
    for nd in list(graph.nodes):
        if nd in members:
            _rebake(nd, {n: k, n + n_txt: k + n_txt} if n_txt else {n: k})


_SHAPE_OPS = {"reshape", "view", "expand"}


def _rebake(node: fx.Node, sizes: dict[int, int]) -> None:
    """Dynamo specialises ``x.reshape(*x.shape[:-1], -1, 2)`` (Flux's rotary embedding) and
    ``split_with_sizes`` of the joint sequence to the traced token count: rewrite those
    constants to the selected count (and SD3's slices of its joint sequence at N). A shape argument is rewritten at the first position p >= 1
    where both the argument and the input's dim p equal a token count (so a model dim that
    happens to equal N is left alone); fake-tensor propagation checks the result."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not node.args or not isinstance(node.args[0], fx.Node):
        return
    src = tensor_meta(node.args[0])
    if src is None:
        return
    s_in = src[0]
    if name in _SHAPE_OPS:
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        shp = list(node.args[1]) if packed else list(node.args[1:])
        for p in range(1, min(len(shp), len(s_in))):
            if isinstance(shp[p], int) and shp[p] == s_in[p] and shp[p] in sizes:
                shp[p] = sizes[shp[p]]
                node.args = (node.args[0], shp) if packed else (node.args[0], *shp)
                return
    elif node.target is operator.getitem and isinstance(node.args[1], tuple) and len(sizes) == 2:
        # SD3 splits its joint [image, text] sequence by slicing at N: x[:, :N], x[:, N:]
        (n, k), (joint, _) = sorted(sizes.items())
        idx = list(node.args[1])
        for p, sl in enumerate(idx):
            if p >= len(s_in) or not isinstance(sl, slice) or s_in[p] != joint or sl.step not in (None, 1):
                continue
            new = slice(k if sl.start == n else sl.start, k if sl.stop == n else sl.stop, sl.step)
            if new != sl:
                idx[p] = new
                node.args = (node.args[0], tuple(idx))
                return
    elif name == "split_with_sizes" and len(node.args) >= 2:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        parts = list(node.args[1])
        total = s_in[dim] if -len(s_in) <= dim < len(s_in) else None
        if total in sizes and sum(parts) == total:
            # the image part: the entry whose replacement gives the new total
            new_total = sizes[total]
            for i, v in enumerate(parts):
                if v - (total - new_total) >= 1 and v in sizes and sizes[v] == v - (total - new_total):
                    parts[i] = sizes[v]
                    node.args = (node.args[0], parts, *node.args[2:])
                    return


def attach_token_select(gm: fx.GraphModule) -> fx.GraphModule:
    """After the block-cache pass: a changed token set forces full block computations (the
    ``force`` control placeholder ``fc_force`` is overridden by ``force_full_if``). Edits ``gm``
    in place; a graph without the ``changed`` node (the 100 % variant) is returned unchanged."""
    graph = gm.graph
    changed = next((nd for nd in graph.nodes if nd.meta.get("fc_token_select") == "changed"), None)
    force = next((nd for nd in graph.nodes if nd.op == "placeholder" and nd.name == "fc_force"), None)
    if changed is None or force is None:
        return gm
    with graph.inserting_after(changed):
        eff = graph.call_function(force_full_if, (changed, force))
    set_val(eff, node_value(force))
    force.replace_all_uses_with(eff, delete_user_cb=lambda u: u is not eff)
    graph.lint()
    gm.recompile()
    return gm
