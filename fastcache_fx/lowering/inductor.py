"""Lower a graph with Inductor's ``compile_fx`` (which runs AOTAutograd itself)."""

from __future__ import annotations

import torch
from torch import fx


def compile_graph(gm: fx.GraphModule, example_inputs: list, mode: str | None = None):
    """Compile ``gm`` once with Inductor.

    Args:
        mode: a ``torch.compile`` mode ("default", "reduce-overhead", "max-autotune"...); its
            Inductor options are applied as config patches.

    Returns:
        the compiled callable, called with positional arguments (Dynamo's convention).
    """
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)
