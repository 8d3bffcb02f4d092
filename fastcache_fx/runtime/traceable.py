"""What a model with diffusers hooks needs so that Dynamo traces its blocks whole.

Context parallelism (``model.enable_parallelism``) installs diffusers hooks from the class's
``_cp_plan``; Wan's plan hooks ``blocks.0`` (it shards the block's ``hidden_states``) and warns
through ``logger.warning_once`` when a timestep is not 2-D. Two things then stop Dynamo
(torch 2.13, diffusers 0.42.1), and the whole block loop runs eagerly, uncached:

- ``logger.warning_once`` inside traced code is a graph break ("logging.Logger method not
  supported"); Dynamo's remedy is its ``ignore_logging_functions`` option (``torch_compat``);
- a block class marked ``maybe_allow_in_graph`` (``WanTransformerBlock``) whose forward a hook
  wraps: Dynamo treats the wrapped forward as an in-graph callable and fails on
  ``hasattr(forward, "__wrapped__")``, a graph break inside the block loop, so Dynamo skips the
  frame. Without a hook the class is traced as a module (its mark is not consulted), so taking the
  mark off a hooked class changes nothing else.
"""

from __future__ import annotations

import logging

import torch

from .. import torch_compat


def traceable_hooks(module: torch.nn.Module) -> list[str]:
    """Prepare ``module`` (with diffusers hooks installed) for tracing; returns the block classes
    whose in-graph mark was taken off (for the debug log). Idempotent; nothing to do without hooks."""
    hooked = [m for m in module.modules() if getattr(m, "_diffusers_hook", None) is not None]
    if not hooked:
        return []
    warn_once = getattr(logging.Logger, "warning_once", None)  # diffusers adds it to Logger
    if warn_once is not None:
        torch_compat.ignore_logging_function(warn_once)
    freed = []
    for m in hooked:
        cls = type(m)
        if m is not module and cls.__name__ not in freed and torch_compat.disallow_in_graph_if_allowed(cls):
            freed.append(cls.__name__)
    return freed
