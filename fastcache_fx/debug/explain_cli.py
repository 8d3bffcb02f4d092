"""``fastcache-fx explain``: blocks found, blocks left alone, graph diff of the block-cache pass.

    fastcache-fx explain --model pixart                       # report + diff on stdout
    fastcache-fx explain --model flux --dump out/ --dot out/  # dumps for ``fastcache-fx diff``, .dot files
    fastcache-fx explain --model dit --trace dit.png --steps 20

``--model reference`` is the bundled reference DiT (x [2, 1, 8, 8], timestep [2], class_labels
[2]); the other names are tiny random-weight diffusers models from ``fastcache_fx.zoo``.
``--trace`` additionally compiles with ``backend="fastcache"`` (Inductor), runs ``--steps``
calls with timesteps decreasing linearly to 0 and writes the decision heat map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import zoo
from ..config import FastCacheConfig

MODELS = ("reference",) + zoo.FAMILIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=MODELS, default="reference", help="model to explain (default: reference)")
    p.add_argument("--dump", type=Path, default=None, metavar="DIR",
                   help="write graph_<i>_before.txt / _after.txt / .diff and explain.txt there")
    p.add_argument("--dot", type=Path, default=None, metavar="DIR", help="write block-level graph_<i>.dot files there")
    p.add_argument("--trace", type=Path, default=None, metavar="PNG",
                   help="compile with backend='fastcache', run --steps steps and write the decision heat map")
    p.add_argument("--steps", type=int, default=20, help="steps of the --trace run (default 20)")
    p.add_argument("--threshold", type=float, default=None, help="cache_ratio_threshold")
    p.add_argument("--no-diff", action="store_true", help="print the block report without the graph diff")


def _reference_inputs():
    from .. import reference as R

    try:
        model = R.load()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--model reference: the bundled reference weights are missing ({e}); "
                                "train them with python -m fastcache_fx.reference.train, or pick a zoo model "
                                f"({', '.join(zoo.FAMILIES)})") from None
    kw = dict(hidden_states=torch.randn(2, 1, 8, 8), timestep=torch.full((2,), 500, dtype=torch.long),
              class_labels=torch.tensor([3, R.NULL_CLASS]))
    return model, kw


def load_model(name: str):
    """(model in eval mode, example kwargs) for a ``--model`` name.

    Raises:
        FileNotFoundError: ``reference`` without bundled weights.
        ValueError: unknown name.
    """
    if name == "reference":
        return _reference_inputs()
    return zoo.build(name)


def _timesteps(example: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps] timesteps from high to 0: 999 -> 0 (DDPM-style), 1 -> 0 for flow-matching sigmas."""
    top = 1.0 if example.is_floating_point() and float(example.max()) <= 1.0 else 999.0
    return torch.linspace(top, 0.0, steps).to(example.dtype)


def trace_run(model, kwargs: dict, steps: int, png: Path, options: dict) -> dict:
    """Compile ``model`` with the fastcache backend, run ``steps`` calls with decreasing timesteps
    (an Euler-like update of ``hidden_states`` when the output has its shape) and write the heat map.

    Returns:
        ``fastcache_fx.stats(model)``.
    """
    import fastcache_fx

    from .heatmap import decision_heatmap

    torch.compiler.reset()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options=options)
    kw = dict(kwargs)
    x = kw["hidden_states"]
    ts = _timesteps(kw["timestep"], steps)
    with torch.no_grad():
        for t in ts:
            kw["timestep"] = torch.full_like(kwargs["timestep"], t.item())
            out = compiled(**{**kw, "hidden_states": x}, return_dict=False)[0]
            if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
                out = out[:, : x.shape[1]]  # learned sigma: keep the noise prediction
            if out.shape == x.shape:
                x = x - out / steps
    st = fastcache_fx.stats(model)
    decision_heatmap(st, png)
    return st


def run(a) -> int:
    if a.steps < 1:
        raise ValueError("--steps: must be >= 1")
    options = {} if a.threshold is None else {"cache_ratio_threshold": a.threshold}
    config = FastCacheConfig.from_options(options)  # ValueError naming the field, before any work
    from .explain import explain

    model, kw = load_model(a.model)
    report = explain(model, config=config, dump_dir=a.dump, dot_dir=a.dot, **kw)
    print(report.text(diff=not a.no_diff), end="")
    for p in report.files:
        print(f"wrote {p}")
    if a.trace is not None:
        st = trace_run(model, kw, a.steps, a.trace, options)
        print(f"{st['steps']} steps, block_approx_ratio {st['block_approx_ratio']:.2f}; wrote {a.trace}")
    return 0
