"""Readable, diff-friendly text dumps of FX graphs, and block-level Graphviz graphs.

Dynamo names nodes ``linear``, ``linear_1``, ... in graph order, so one extra node early in a
graph renumbers every later one and a plain text diff of two captures is mostly noise. The
dump here names nodes canonically instead:

- placeholders: parameters by their module path (``transformer_blocks.0.norm1.linear.weight``),
  user inputs by their argument name (``hidden_states``), other placeholders (``fc_...`` state)
  verbatim;
- call nodes: ``<scope>.<op>_<k>`` where scope is the block the node runs in
  (``transformer_blocks.3``) or ``glue``, and k counts nodes of the same op within that scope;
- ``getitem`` of a named node: ``<parent>[i]``;
- nodes a pass inserted (no canonical name recorded before the pass): scope ``fastcache``.

A pass keeps the canonical names of the nodes it did not touch when the names are recorded in
``node.meta[NAME_KEY]`` before the pass (``tag_canonical_names``): ``Graph.node_copy`` copies
``meta``, so clones and extracted branches carry them along.
"""

from __future__ import annotations

import operator
import re
from collections import Counter

import torch
from torch import fx

from .. import torch_compat
from ..passes.blocks import block_of, find_blocks, is_param
from ..passes.graph_utils import node_value

NAME_KEY = "fastcache_debug_name"


# names ---------------------------------------------------------------------------------------
def _placeholder_name(node: fx.Node) -> str:
    """``l_self_dict_modules_pos_embed_modules_proj_parameters_weight_`` -> ``pos_embed.proj.weight``;
    ``l_hidden_states_`` -> ``hidden_states``; anything else verbatim."""
    name = node.name
    if is_param(node) and re.match(r"[lL]_(self|fn)_", name):  # torch.compile(module) / (nn.Sequential)
        s = re.sub(r"^[lL]_(self|fn)_(dict_)?(modules_)?", "", name)
        s = re.sub(r"_modules_", ".", s)
        s = re.sub(r"_(parameters|buffers)_", ".", s)
        return s.rstrip("_")
    m = re.fullmatch(r"[lL]_(?:kwargs_)?(.+)_", name)  # forward(**kwargs) inputs: l_kwargs_<name>_
    return m.group(1) if m else name


def _short_op(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        name = getattr(t, "__name__", None) or str(t)
    else:
        name = str(t)
    return re.sub(r"\W", "_", name)


def canonical_names(gm: fx.GraphModule, placeholder_names: list[str] | None = None,
                    scope: str | None = None) -> dict[fx.Node, str]:
    """Node -> stable name (see module docstring); names recorded in ``meta[NAME_KEY]`` win.

    Args:
        placeholder_names: names for the placeholders in order (a cond branch: the canonical
            names of the cond's operands in the parent graph).
        scope: scope of call nodes outside any block; default ``fastcache`` in a graph tagged
            before a pass (untagged nodes are the ones the pass inserted), else ``glue``.

    Returns:
        a dict over every node of ``gm.graph``; names are unique within the graph.
    """
    names: dict[fx.Node, str] = {}
    new_scope = scope or ("fastcache" if any(NAME_KEY in n.meta for n in gm.graph.nodes) else "glue")
    ph_names = iter(placeholder_names or ())
    used: Counter = Counter()
    counts: Counter = Counter()

    def unique(name: str) -> str:
        used[name] += 1
        return name if used[name] == 1 else f"{name}#{used[name] - 1}"

    for node in gm.graph.nodes:
        recorded = node.meta.get(NAME_KEY)
        if recorded is not None:
            names[node] = unique(recorded)
            continue
        if node.op == "placeholder":
            names[node] = unique(next(ph_names, None) or _placeholder_name(node))
        elif node.op == "output":
            names[node] = "output"
        elif node.op == "get_attr":
            names[node] = unique(str(node.target))
        elif (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
              and isinstance(node.args[1], int)):
            names[node] = unique(f"{names[node.args[0]]}[{node.args[1]}]")
        else:
            b = block_of(node)
            scope = b[0] if b is not None else new_scope
            short = _short_op(node)
            k = counts[(scope, short)]
            counts[(scope, short)] += 1
            names[node] = unique(f"{scope}.{short}_{k}")
    return names


def tag_canonical_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Record ``canonical_names(gm)`` in each node's meta (so copies made by a pass keep them).

    Returns:
        the names.
    """
    names = canonical_names(gm)
    for n, name in names.items():
        n.meta[NAME_KEY] = name
    return names


# text ----------------------------------------------------------------------------------------
def format_value(v) -> str:
    """``float32[2, 16, 16]`` for a tensor, tuples of those, ints/SymInts as text, else ``?``."""
    if isinstance(v, torch.Tensor):
        return f"{str(v.dtype).replace('torch.', '')}[{', '.join(str(d) for d in v.shape)}]"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(format_value(x) for x in v) + ")"
    if isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat)) or v is None:
        return str(v)
    return "?"


def _format_arg(a, names: dict[fx.Node, str]) -> str:
    if isinstance(a, fx.Node):
        return names[a]
    if isinstance(a, tuple):
        inner = ", ".join(_format_arg(x, names) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_format_arg(x, names) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_format_arg(v, names)}" for k, v in a.items()) + "}"
    if isinstance(a, slice):
        return f"slice({_format_arg(a.start, names)}, {_format_arg(a.stop, names)}, {_format_arg(a.step, names)})"
    return str(a) if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)) else repr(a)


def _target_text(node: fx.Node) -> str:
    if node.op == "call_function":
        try:
            return torch_compat.qualified_name(node.target)
        except Exception:  # builtins without a module path
            return getattr(node.target, "__name__", repr(node.target))
    if node.op == "call_method":
        return "." + str(node.target)
    return str(node.target)


def _node_line(node: fx.Node, names: dict[fx.Node, str]) -> str:
    has_val = "val" in node.meta or "example_value" in node.meta
    val = format_value(node_value(node)) if has_val else "?"
    if node.op == "placeholder":
        kind = "param" if is_param(node) else "state" if names[node].startswith("fc_") else "input"
        return f"{names[node]} : {val} = {kind}"
    if node.op == "get_attr":
        sub = getattr(node.graph.owning_module, str(node.target), None) if node.graph.owning_module else None
        what = f"graph({sum(1 for _ in sub.graph.nodes)} nodes)" if isinstance(sub, fx.GraphModule) else "attr"
        return f"{names[node]} = get_attr {what}"
    if node.op == "output":
        return "return " + _format_arg(node.args[0], names)
    args = ", ".join([_format_arg(a, names) for a in node.args]
                     + [f"{k}={_format_arg(v, names)}" for k, v in node.kwargs.items()])
    return f"{names[node]} = {_target_text(node)}({args})" + (f"  # {val}" if has_val else "")


def graph_text(gm: fx.GraphModule, title: str = "graph", *, full_branches: bool = False,
               placeholder_names: list[str] | None = None, scope: str | None = None) -> str:
    """A readable dump of ``gm``: one line per node with canonical names and value shapes,
    a ``# -- scope --`` line where the scope (inputs, block, glue, fastcache) changes, then every
    submodule that is a ``torch.cond`` branch, its placeholders named after the cond's operands.
    Branches holding a whole block body (``fc_*_full``) are summarised unless ``full_branches``.

    Args:
        placeholder_names, scope: see ``canonical_names``.

    Returns:
        the text (newline-terminated lines).
    """
    names = canonical_names(gm, placeholder_names, scope)
    lines = [f"# {title}: {sum(1 for _ in gm.graph.nodes)} nodes"]
    current = None
    operands: dict[str, list[str]] = {}  # branch submodule -> canonical names of the cond operands
    for node in gm.graph.nodes:
        if node.op == "call_function" and torch_compat.is_cond(node.target):
            ops = [names[a] if isinstance(a, fx.Node) else repr(a) for a in node.args[3]]
            for br in node.args[1:3]:
                if isinstance(br, fx.Node):
                    operands[str(br.target)] = ops
        b = block_of(node) if node.op.startswith("call_") else None
        s = (b[0] if b is not None else "inputs" if node.op == "placeholder" else "outputs" if node.op == "output"
             else names[node].split(".", 1)[0] if names[node].startswith(("fastcache.", "glue.")) else "fastcache")
        if s != current:
            lines.append(f"# -- {s} --")
            current = s
        lines.append(_node_line(node, names))
    for name, sub in gm.named_children():
        if not isinstance(sub, fx.GraphModule):
            continue
        n = sum(1 for _ in sub.graph.nodes)
        if name.endswith("_full") and not full_branches:
            blocks = sorted({b[0] for x in sub.graph.nodes if x.op.startswith("call_") and (b := block_of(x))})
            lines.append(f"# submodule {name}: {n} nodes (the body of {', '.join(blocks) or 'the block'}, unchanged)")
            continue
        lines.append(f"# submodule {name}:")
        text = graph_text(sub, name, full_branches=full_branches, placeholder_names=operands.get(name), scope="fastcache")
        lines.extend("    " + ln for ln in text.splitlines()[1:])
    return "\n".join(lines) + "\n"


# block-level Graphviz ------------------------------------------------------------------------
def _dot_escape(s: str) -> str:
    return s.replace('"', '\\"')  # labels keep their \\n line breaks


def block_dot(gm: fx.GraphModule, title: str = "graph", cached: set[str] | None = None) -> str:
    """The block-level graph of ``gm`` in Graphviz dot syntax (text; no graphviz binary needed).

    Nodes: one per user input, one per maximal run of glue nodes (labelled with its node count
    and most frequent ops), one per block, and the output. Edges: data flow between them
    (parameters left out); bold with the shape for stream values (a block's stream input or
    output), dashed for context inputs and other glue values.

    Args:
        cached: block names rewritten into ``torch.cond`` (drawn filled); None: ``find_blocks``' regions.
    """
    search = find_blocks(gm)
    if cached is None:
        cached = {r.name for r in search.regions}
    streams = {n for r in search.regions for n in r.stream_inputs + r.stream_outputs}
    names = canonical_names(gm)
    unit_of: dict[fx.Node, str] = {}
    units: dict[str, dict] = {}
    glue_k, prev_unit = 0, None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if is_param(node):
                continue
            u = f"in_{len(units)}"
            units[u] = {"label": f"{names[node]}\\n{format_value(node_value(node))}", "shape": "oval", "ops": None}
        elif node.op == "output":
            u = "output"
            units[u] = {"label": "output", "shape": "oval", "ops": None}
        elif node.op == "get_attr":
            continue
        else:
            b = block_of(node)
            if b is not None:
                u = b[0]
                units.setdefault(u, {"label": f"{b[0]}\\n{b[3]}", "shape": "box", "ops": Counter()})
            else:
                if prev_unit is None or not prev_unit.startswith("glue_"):
                    glue_k += 1
                u = f"glue_{glue_k - 1}"
                units.setdefault(u, {"label": f"glue {glue_k - 1}", "shape": "box", "ops": Counter()})
            units[u]["ops"][_short_op(node)] += 1
        unit_of[node] = u
        prev_unit = u
    edges: dict[tuple[str, str], list[str]] = {}  # (src, dst) -> shapes of the stream values it carries
    for node in gm.graph.nodes:
        dst = unit_of.get(node)
        if dst is None:
            continue
        for a in node.all_input_nodes:
            src = unit_of.get(a)
            if src is None or src == dst:
                continue
            shapes = edges.setdefault((src, dst), [])
            if a in streams and format_value(node_value(a)) not in shapes:
                shapes.append(format_value(node_value(a)))
    lines = [f'digraph "{_dot_escape(title)}" {{', "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];']
    for u, d in units.items():
        label = d["label"]
        if d["ops"] is not None:
            top = ", ".join(f"{k} x{v}" for k, v in d["ops"].most_common(4))
            label += f"\\n{sum(d['ops'].values())} ops: {top}"
        style = ', style=filled, fillcolor="lightblue"' if u in cached else ""
        if u in cached:
            label += "\\n(torch.cond: cached)"
        lines.append(f'  "{_dot_escape(u)}" [label="{_dot_escape(label)}", shape={d["shape"]}{style}];')
    for (src, dst), shapes in edges.items():
        label = "\\n".join(shapes)  # dot's line break
        attrs = f'label="{_dot_escape(label)}", penwidth=2' if shapes else "style=dashed"
        lines.append(f'  "{_dot_escape(src)}" -> "{_dot_escape(dst)}" [{attrs}];')
    lines.append("}")
    return "\n".join(lines) + "\n"
