"""What a model needs so that Dynamo traces its blocks whole, applied through either entry point.

``enable_fastcache`` prepares a model before compiling it (``prepare``). A bare
``torch.compile(model, backend="fastcache")`` gives the backend no model, only graphs: a model
that needs preparing (HiDream's host-routed mixture of experts, Mochi's data-dependent token
selection, diffusers hooks on a block) reaches the backend as fragments split at graph breaks,
none holding a whole block. ``on_graph`` (called by the backend for every graph it is handed)
finds the ``OptimizedModule`` whose call is being traced on the Python stack, prepares its model
once, and makes the next call trace the model again (``reset_code`` of its ``forward``: Dynamo's
cached entries of that code object would still match, their guards do not see the change; and
``uncompiled.unskip``: a graph break inside the block loop made Dynamo run that forward eagerly): the
first call runs the fragments (plain Inductor, every block computed), every later call the whole
graph with the cache. The fragments' graphs are dropped from the model's statistics at the retrace.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref

import torch

from . import registry
from .opaque import make_opaque_moe, routes_on_host
from .traceable import traceable_hooks
from .. import torch_compat

log = logging.getLogger("fastcache_fx")

#: classes traced with ``capture_dynamic_output_shape_ops``: Mochi's text mask selects tokens by
#: value (``nonzero``), a data-dependent shape; without it Dynamo breaks the graph inside every
#: block. Not for every class: HunyuanVideo 1.5's graph, traced with it, hides its main blocks from
#: the block search (unbacked sizes)
DYNAMIC_OUTPUT_SHAPE_CLASSES = frozenset({"MochiTransformer3DModel"})

_SEEN: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def prepare(module: torch.nn.Module) -> list[str]:
    """Make ``module``'s blocks traceable whole: host-routed MoE layers become one opaque op each
    (``runtime.opaque``), hooked block classes lose their in-graph mark (``runtime.traceable``),
    tensor-subclass weights become plain tensors (``unwrap_subclass_parameters``).
    Returns what was changed now (empty when nothing was needed or it was done before)."""
    moe = [n for n, m in module.named_modules() if routes_on_host(m) and "_fastcache_forward" not in m.__dict__]
    make_opaque_moe(module)
    freed = traceable_hooks(module)
    unwrapped = unwrap_subclass_parameters(module)
    return ([f"opaque MoE {n}" for n in moe] + [f"hooks traceable on {c}" for c in freed]
            + ([f"{len(unwrapped)} tensor-subclass parameters unwrapped"] if unwrapped else []))


def unwrap_subclass_parameters(module: torch.nn.Module) -> list[str]:
    """Parametrize every tensor-subclass parameter or buffer of ``module`` (torchao's quantized
    weights: ``Int8Tensor``...) by its plain inner tensors (torch's
    ``unwrap_tensor_subclass_parameters``, ``torch.nn.utils.parametrize``); returns their names.

    Why: a ``torch.cond`` operand that is a tensor subclass fails in AOTAutograd ("no rule
    registered for HOP cond and subclass FunctionalTensor", torch 2.13); with the plain tensors as
    graph inputs, the subclass is rebuilt inside each branch and its ops decompose to plain ones.
    The model computes the same; its ``state_dict`` keys of those weights change to
    ``parametrizations.<name>.original<i>``."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    names = [n for n, p in list(module.named_parameters()) + list(module.named_buffers())
             if is_traceable_wrapper_subclass(p)]
    if names:
        from torch._functorch._aot_autograd.subclass_parametrization import unwrap_tensor_subclass_parameters

        unwrap_tensor_subclass_parameters(module)
    return names


def needs_dynamic_output_shapes(module: torch.nn.Module) -> bool:
    """Whether ``module``'s class is traced with ``capture_dynamic_output_shape_ops``."""
    return type(module).__name__ in DYNAMIC_OUTPUT_SHAPE_CLASSES


def dynamic_output_shapes(forward):
    """``forward`` run with Dynamo's ``capture_dynamic_output_shape_ops`` on."""
    return torch_compat.dynamo_config_patch(capture_dynamic_output_shape_ops=True)(forward)


def mark_prepared(compiled: torch.nn.Module) -> None:
    """``compiled`` (an ``OptimizedModule``) was prepared by ``enable_fastcache``: ``on_graph``
    leaves it alone."""
    _SEEN.add(compiled)


def _optimized_module_on_stack():
    """The innermost ``OptimizedModule`` whose call is on the Python stack, or None (regional
    compilation, ``model.compile()`` in place, a compiled function)."""
    OptimizedModule = torch_compat.optimized_module_class()

    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in ("__call__", "_wrapped_call_impl", "_call_impl"):
            me = f.f_locals.get("self")
            if isinstance(me, OptimizedModule):
                return me
        f = f.f_back
    return None


def needs(module: torch.nn.Module) -> list[str]:
    """What ``prepare`` would change in ``module`` (nothing is changed here)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out = [f"opaque MoE {n}" for n, m in module.named_modules()
           if routes_on_host(m) and "_fastcache_forward" not in m.__dict__]
    # a hooked block class that diffusers put in the graph as it is would hide the blocks; hooks
    # elsewhere (context parallelism's on the model, ours on a child) trace as they are
    if any(getattr(m, "_diffusers_hook", None) is not None and torch_compat.allowed_in_graph(type(m)) is not False
           for m in module.modules() if m is not module):
        out.append("diffusers hooks made traceable")
    sub = [n for n, p in list(module.named_parameters()) + list(module.named_buffers())
           if is_traceable_wrapper_subclass(p)]
    if sub:
        out.append(f"{len(sub)} tensor-subclass parameters unwrapped")
    return out


def on_graph() -> list[str]:
    """Called by the backend for each graph Dynamo hands it: register all parameters of the model
    of a bare ``torch.compile`` under one registry entry and, when it needs preparing, prepare it
    at its next call and trace it again (see the module docstring). Nothing is changed while
    Dynamo compiles: its guards read the modules as they were traced. Returns what will be
    changed (empty when nothing: already seen, nothing needed, or no ``OptimizedModule``)."""
    opt = _optimized_module_on_stack()
    if opt is None or opt in _SEEN:
        return []
    _SEEN.add(opt)
    module = opt._orig_mod
    # one entry for all the model's parameters: graphs split at graph breaks whose parameters do not
    # overlap (Z-Image's glue, its refiner and main blocks) are then one model's graphs in stats()
    registry.entry_for_params(module.parameters()).module = weakref.ref(module)
    changed = needs(module)
    forward = opt.forward
    if needs_dynamic_output_shapes(module):
        changed.append("capture_dynamic_output_shape_ops")
        forward = dynamic_output_shapes(forward)
    if not changed:
        return []
    code = type(module).forward.__code__
    pending = [True]
    registry.lookup(module).preparing = True  # the fragments of this first call warn nothing

    @functools.wraps(forward)
    def retraced(*args, **kwargs):
        if pending:
            pending.clear()
            entry = registry.lookup(module)
            prepare(module)
            registry.entry_for_params(module.parameters(), default=entry)  # unwrapped parameters' tensors
            _retrace(module, code)
        return forward(*args, **kwargs)

    opt.forward = retraced
    log.info("fastcache: %s needs preparing for tracing (%s); its next call is traced again",
             type(module).__name__, ", ".join(changed))
    return changed


def _retrace(module: torch.nn.Module, code) -> None:
    """Drop Dynamo's compiled entries of ``code`` and the model's fragment graphs."""
    from .state import FallbackRuntime

    from .uncompiled import unskip

    torch_compat.reset_compiled_code(code)
    # the frames Dynamo compiled on their own while the forward ran eagerly (HiDream's blocks, split
    # at their MoE) keep entries whose guards still match: every submodule class traces again too
    for cls in {type(m) for m in module.modules()}:
        sub = getattr(getattr(cls, "forward", None), "__code__", None)
        if sub is not None and sub is not code:
            torch_compat.reset_compiled_code(sub)
    unskip(module)  # a graph break inside the block loop made Dynamo run the forward eagerly for good
    entry = registry.lookup(module)
    if entry is not None:
        entry.graphs[:] = [g for g in entry.graphs if not isinstance(g, FallbackRuntime)]
        with entry.requests.lock:
            entry.requests.last_run.clear()
        entry.preparing = False
