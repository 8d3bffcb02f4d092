"""Lower a graph with Inductor's ``compile_fx`` (which runs AOTAutograd itself)."""

from __future__ import annotations

from torch import fx

from .. import torch_compat


def compile_graph(gm: fx.GraphModule, example_inputs: list, mode: str | None = None):
    """Compile ``gm`` once with Inductor.

    Args:
        mode: a ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune"...); its
            Inductor options are applied as config patches.

    Returns:
        the compiled callable, called with positional arguments (Dynamo's convention).
    """
    return torch_compat.inductor_compile(gm, example_inputs, mode)
