"""The package's layering (docs/architecture.md): no import circle, passes and ops never import
the runtime, ops import neither FX passes nor the runtime. Every import counts, lazy ones too."""

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "fastcache_fx"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, mods) -> set[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("fastcache_fx")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fastcache_fx"):
                continue
            for a in node.names:  # "from .. import approx" imports the submodule, not the package
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
    return out


@pytest.fixture(scope="module")
def graph():
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    g = nx.DiGraph()
    for name, path in mods.items():
        g.add_node(name)
        for dep in _imports(path, name, mods):
            if dep in mods and dep != name:
                g.add_edge(name, dep)
    return g


def test_no_import_circle(graph):
    cycles = [c for c in nx.simple_cycles(graph) if not _only_init(c)]
    assert not cycles, f"import circles: {cycles[:5]}"


def _only_init(cycle) -> bool:
    # a package __init__ importing its own submodules, which import a sibling through the package
    return all(m.startswith(cycle[0].rsplit(".", 1)[0]) for m in cycle) and any(
        m == cycle[0].rsplit(".", 1)[0] for m in cycle)


@pytest.mark.parametrize("layer,forbidden", [
    ("fastcache_fx.passes", ("fastcache_fx.runtime", "fastcache_fx.backend", "fastcache_fx.lowering")),
    ("fastcache_fx.ops", ("fastcache_fx.runtime", "fastcache_fx.passes", "fastcache_fx.backend")),
    ("fastcache_fx.approx", ("fastcache_fx.runtime", "fastcache_fx.passes", "fastcache_fx.backend")),
    ("fastcache_fx.contract", ("fastcache_fx.runtime", "fastcache_fx.passes", "fastcache_fx.backend")),
])
def test_layers(graph, layer, forbidden):
    bad = [(a, b) for a, b in graph.edges if (a == layer or a.startswith(layer + "."))
           and any(b == f or b.startswith(f + ".") for f in forbidden)]
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


#: private torch names only fastcache_fx/torch_compat.py may use (docs/torch-and-gpu.md)
PRIVATE_TORCH = ("torch._C", "torch._dynamo", "torch._inductor", "torch._guards", "torch._subclasses",
                 "torch._higher_order_ops", "torch._prims", "torch._logging", "torch._export", "trace_rules",
                 "TracingContext", "traced_code", "torch.ops.higher_order", "torch.ops.prims", "_dynamo_source",
                 "_get_qualified_name", "_resolve_process_group", "_param_name_to_source")


def test_private_torch_only_in_torch_compat():
    """Every private torch internal goes through torch_compat (its versions and fallbacks are kept
    there); docstrings and comments may name them."""
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.name == "torch_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            text = None
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                text = ast.unparse(node)
            elif isinstance(node, ast.Attribute):
                text = ast.unparse(node)
            if text and not text.startswith("torch_compat.") and any(p in text for p in PRIVATE_TORCH):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {text}")
    assert not bad, "private torch internals outside torch_compat:\n" + "\n".join(sorted(set(bad)))
