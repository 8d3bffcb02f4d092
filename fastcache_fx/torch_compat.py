"""Every private torch internal fastcache-fx uses, in one place (docs/torch-and-gpu.md).

The supported range is ``SUPPORTED`` (pyproject's ``torch`` requirement says the same). Private
Dynamo / Inductor names move between releases, so the rest of the package reaches them only
through this module (``tests/test_layout.py`` checks that no other module names them). Each entry
says what it is for, the releases it was checked on (``CHECKED``, the torch matrix of
docs/torch-and-gpu.md), and what happens when the internal is missing: a fallback that keeps
results right (maybe slower, or a graph break more), or, where there is none, an error naming
the internal. ``probe()`` lists which internals this torch has; the GPU check's preflight and
``tests/test_torch_compat.py`` print / check it.

Public APIs are used directly elsewhere (``torch.compiler.reset``, ``torch.cond``,
``torch.export``, ``torch.fx``), except where the public spelling is missing in part of the range.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger("fastcache_fx")

#: the torch releases this package supports: [low, high) as (major, minor)
SUPPORTED = ((2, 11), (2, 16))
#: the releases every entry below was checked on (benchmarks/torch_matrix.sh)
CHECKED = ("2.11.0", "2.13.0", "2.15.0")


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the installed torch), e.g. ``"2.13.0+cpu"`` -> (2, 13)."""
    parts = (version or torch.__version__).split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def in_supported_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed torch) lies in ``SUPPORTED``."""
    return SUPPORTED[0] <= torch_version(version) < SUPPORTED[1]


def warn_if_unsupported() -> None:
    """A ``UserWarning`` when the installed torch lies outside ``SUPPORTED`` (called once at import
    of fastcache_fx): the internals below were not checked there."""
    if not in_supported_range():
        lo, hi = SUPPORTED
        warnings.warn(f"fastcache_fx supports torch >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]} (checked on "
                      f"{', '.join(CHECKED)}); this is torch {torch.__version__}: private Dynamo / Inductor "
                      "internals it uses may differ (fastcache_fx/torch_compat.py)", UserWarning, stacklevel=2)


# Dynamo ---------------------------------------------------------------------------------------

#: Dynamo's logger that reports "hit config.recompile_limit" (torch/_dynamo/convert_frame.py,
#: 2.11-2.15); a missing logger only means no reason text is caught.
DYNAMO_RECOMPILE_LOGGER = "torch._dynamo.convert_frame"


def recompile_limit_error() -> tuple[type[BaseException], ...]:
    """The exception Dynamo raises under ``fullgraph=True`` at the recompile limit, as a tuple for
    ``except`` (``torch._dynamo.exc.FailOnRecompileLimitHit``, 2.11-2.15); ``()`` when missing
    (then nothing is caught and the caller's second try does not happen)."""
    exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    cls = getattr(exc, "FailOnRecompileLimitHit", None)
    return (cls,) if cls is not None else ()


def dynamo_restart_signals() -> tuple[type[BaseException], ...]:
    """Exceptions Dynamo raises inside a backend to restart its analysis
    (``torch._dynamo.exc.RestartAnalysis`` and subclasses such as ``TensorifyScalarRestartAnalysis``
    under ``dynamic=True``, 2.11-2.15): a backend's safety net must let them through."""
    exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    return tuple(c for c in [getattr(exc, "RestartAnalysis", None)] if c is not None)


def ignore_logging_function(fn: Callable) -> bool:
    """Let Dynamo skip calls of the logging function ``fn`` instead of breaking the graph
    (``torch._dynamo.config.ignore_logging_functions``, a set, 2.11-2.15). Missing: nothing is
    done (the call stays a graph break, results unchanged). Returns whether it was registered."""
    funcs = getattr(torch._dynamo.config, "ignore_logging_functions", None)
    if funcs is None:
        return False
    funcs.add(fn)
    return True


def _allowed_callable_ids():
    from torch._dynamo import trace_rules

    return getattr(trace_rules, "_allowed_callable_ids", None)


def allowed_in_graph(cls: type) -> bool | None:
    """Whether ``cls`` is on Dynamo's list of callables put in the graph as they are
    (``trace_rules._allowed_callable_ids``, 2.11-2.15); None where the list cannot be read."""
    ids = _allowed_callable_ids()
    return None if ids is None else id(cls) in ids


def disallow_in_graph_if_allowed(cls: type) -> bool:
    """Take ``cls`` off Dynamo's list of callables put in the graph as they are (diffusers'
    ``maybe_allow_in_graph`` puts block classes there), so a hooked block is traced as a module.

    Reads ``torch._dynamo.trace_rules._allowed_callable_ids`` (a ``FunctionIdSet``, 2.11-2.15) to
    ask first, because ``torch._dynamo.disallow_in_graph`` raises on a callable not on the list.
    Missing: asks by calling it and treats its refusal (``IncorrectUsage`` on 2.11, ``RuntimeError``
    on 2.13) as "not on the list". Returns
    whether the mark was taken off."""
    ids = _allowed_callable_ids()
    if ids is not None:
        if id(cls) not in ids:
            return False
        torch._dynamo.disallow_in_graph(cls)
        return True
    # the refusal: torch._dynamo.exc.IncorrectUsage on 2.11, RuntimeError on 2.13
    refusal = (RuntimeError, AssertionError, *(c for c in [getattr(torch._dynamo.exc, "IncorrectUsage", None)] if c))
    try:
        torch._dynamo.disallow_in_graph(cls)
    except refusal:
        return False
    return True


def reset_frame_strategy(code: Any) -> bool:
    """Let Dynamo trace the code object ``code`` again after it was marked to run eagerly for good
    (``torch._C._dynamo.eval_frame.set_code_exec_strategy`` with ``_FrameExecStrategy(DEFAULT,
    DEFAULT)``, 2.11-2.15). Missing: nothing is done (a forward once marked stays eager: the
    model then runs uncached, which ``stats()`` reports as uncompiled calls). Returns whether it
    was reset."""
    try:
        from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy
    except ImportError:
        return False
    set_code_exec_strategy(code, _FrameExecStrategy(_FrameAction.DEFAULT, _FrameAction.DEFAULT))
    return True


def dynamo_config_patch(**changes: Any):
    """``torch._dynamo.config.patch(**changes)`` (a context manager and decorator, 2.11-2.15).
    An option missing from this torch raises there (``AttributeError`` naming it): no fallback, a
    silently ignored option would change what is traced."""
    return torch._dynamo.config.patch(**changes)


def traced_code() -> Any | None:
    """The first code object Dynamo traced into the graph the backend is compiling (the module's
    ``forward``), or None outside a backend call or when unknown
    (``torch._guards.TracingContext.try_get().traced_code``, 2.11-2.15). Missing: None (the
    backend then judges the graph by its shape alone: regional compilation is not recognised and
    the not-a-denoiser check is skipped)."""
    try:
        from torch._guards import TracingContext
    except ImportError:
        return None
    ctx = TracingContext.try_get()
    codes = getattr(ctx, "traced_code", None) or []
    return codes[0] if codes else None


def detect_fake_mode(inputs: Any):
    """Dynamo's fake-tensor mode of ``inputs`` (a context manager; ``torch._guards.detect_fake_mode``,
    2.11-2.15). No fallback: a dynamic graph's state needs its symbolic sizes."""
    from torch._guards import detect_fake_mode as detect

    return detect(inputs)


def new_fake_mode():
    """A fresh ``FakeTensorMode(allow_non_fake_inputs=True)`` (``torch._subclasses.fake_tensor``,
    2.11-2.15), for propagating shapes through a rewritten graph. No fallback."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def forget_placeholder_source(node: torch.fx.Node) -> None:
    """Mark a placeholder a pass added as having no Dynamo source: AOTAutograd reads
    ``node._dynamo_source`` on every placeholder of a Dynamo graph (2.11-2.15). Setting an
    attribute nothing reads is harmless, so there is nothing to fall back to."""
    node._dynamo_source = None


def copy_dynamo_sources(old: torch.fx.GraphModule, new: torch.fx.GraphModule, node_map: dict) -> None:
    """Carry Dynamo's source records from ``old`` to its copy ``new`` (``node_map``: old node ->
    new node): the module's ``_param_name_to_source`` and each placeholder's ``_dynamo_source``,
    which AOTAutograd reads to tell parameters from inputs (2.11-2.15). Missing on ``old``:
    nothing to copy."""
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source
    for a, b in node_map.items():
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source


def emit_trace_artifact(name: str, text: str) -> None:
    """A tlparse artifact named ``name`` holding ``text`` (``torch._logging.trace_structured``,
    2.11-2.15; writes only with TORCH_TRACE set). Missing: nothing is emitted."""
    trace = getattr(getattr(torch, "_logging", None), "trace_structured", None)
    if trace is not None:
        trace("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: text)


def qualified_name(target: Any) -> str:
    """The dotted name FX prints for a ``call_function`` target (``torch.fx.node._get_qualified_name``,
    2.11-2.15). Missing: ``module.qualname`` of the target (or its ``str``)."""
    try:
        from torch.fx.node import _get_qualified_name

        return _get_qualified_name(target)
    except (ImportError, RuntimeError):
        mod, name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
        return f"{mod}.{name}" if mod and name else str(target)


def process_group_size(name: str) -> int | None:
    """World size of the process group a graph's functional collectives name ``name``
    (``torch.distributed.distributed_c10d._resolve_process_group``, 2.11-2.15), or None when it
    cannot be resolved here (no such group in this process, or the internal is missing)."""
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return int(_resolve_process_group(name).size())
    except Exception:  # no group of that name raises anything from ValueError to RuntimeError
        return None


# Higher-order ops and prims ----------------------------------------------------------------------

def cond_op():
    """The ``torch.cond`` higher-order operator as FX nodes hold it (``torch.ops.higher_order.cond``,
    2.11-2.15; ``torch.cond`` is its public wrapper, which FX graphs do not call directly)."""
    return torch.ops.higher_order.cond


def is_cond(target: Any) -> bool:
    """Whether an FX node's ``target`` is ``torch.cond``'s operator."""
    return target is torch.ops.higher_order.cond


def force_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with contiguous strides that Inductor keeps (``prims.inductor_force_stride_order``,
    registered by ``torch._inductor.inductor_prims``, with ``torch._prims_common.
    make_contiguous_strides_for``, 2.11-2.15): a plain ``.contiguous()`` fused into a neighbour
    can keep a transposed layout that a cond branch's stride assertion rejects (see
    ``ops.decision.fixed_contiguous``). Missing: ``x.contiguous()`` (right in eager; under Inductor
    the stride assertion may fire for models whose patch embedding transposes). Torch 2.11's
    Inductor fails to lower the prim on symbolic sizes ("cannot determine truth value of
    Relational", checked 2026-12-07; 2.13 and 2.15 lower it): there a dynamic-shape graph gets
    ``x.contiguous()`` too."""
    if torch_version() < (2, 13) and any(isinstance(d, torch.SymInt) for d in x.shape):
        return x.contiguous()
    try:
        # registers the prim outside Inductor too (importlib: a local ``import torch.x`` would make
        # ``torch`` a local name of this function)
        importlib.import_module("torch._inductor.inductor_prims")
        from torch._prims_common import make_contiguous_strides_for

        op = torch.ops.prims.inductor_force_stride_order
    except (ImportError, AttributeError):
        return x.contiguous()
    return op(x, make_contiguous_strides_for(x.shape))


# Inductor -----------------------------------------------------------------------------------------

def inductor_compile(gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None):
    """Lower ``gm`` with Inductor (``torch._inductor.compile_fx.compile_fx``, which runs AOTAutograd
    itself; a ``torch.compile`` mode's options from ``torch._inductor.list_mode_options``,
    2.11-2.15). No fallback: this is the lowering. Returns the compiled callable (positional
    arguments)."""
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def inductor_config_patch(changes: dict):
    """``torch._inductor.config.patch(changes)`` (2.11-2.15). An option missing from this torch
    raises there, naming it."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(changes)


def aoti_compile_and_package(ep, package_path: str) -> str:
    """Compile an ExportedProgram into an AOTInductor package ``package_path`` (``model.pt2``;
    ``torch._inductor.aoti_compile_and_package``, 2.11-2.15). No fallback: export needs it.
    Torch 2.11's C++ wrapper fails in buffer-reuse planning on our graphs ("End index 60 out of
    bounds" in ``EfficientPeakEstimate.peak_between``, checked 2026-12-07; 2.13 and 2.15 do not):
    there buffers are not reused (``allow_buffer_reuse=False``: more memory, same results)."""
    configs = {"allow_buffer_reuse": False} if torch_version() < (2, 13) else None
    return torch._inductor.aoti_compile_and_package(ep, package_path=package_path, inductor_configs=configs)


def aoti_load_package(path: str):
    """Load an AOTInductor package (``torch._inductor.aoti_load_package``, 2.11-2.15): a callable
    runner. No fallback."""
    return torch._inductor.aoti_load_package(path)


# What this torch has ---------------------------------------------------------------------------

def probe() -> dict[str, bool]:
    """Which of the internals above this torch has (name -> present). Cheap: imports only."""
    out: dict[str, bool] = {}

    def has(name: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = fn() is not None
        except Exception:  # an internal that moved raises anything from ImportError to AttributeError
            out[name] = False

    def imp(mod: str, attr: str):
        import importlib

        return getattr(importlib.import_module(mod), attr)

    has("torch._dynamo.exc.FailOnRecompileLimitHit", lambda: imp("torch._dynamo.exc", "FailOnRecompileLimitHit"))
    has("torch._dynamo.config.ignore_logging_functions",
        lambda: imp("torch._dynamo.config", "ignore_logging_functions"))
    has("torch._dynamo.trace_rules._allowed_callable_ids",
        lambda: imp("torch._dynamo.trace_rules", "_allowed_callable_ids"))
    has("torch._dynamo.disallow_in_graph", lambda: imp("torch._dynamo", "disallow_in_graph"))
    has("torch._C._dynamo.eval_frame.set_code_exec_strategy",
        lambda: imp("torch._C._dynamo.eval_frame", "set_code_exec_strategy"))
    has("torch._C._dynamo.eval_frame._FrameExecStrategy",
        lambda: imp("torch._C._dynamo.eval_frame", "_FrameExecStrategy"))
    has("torch._guards.TracingContext.traced_code",
        lambda: "traced_code" in imp("torch._guards", "TracingContext").__init__.__code__.co_names or None)
    has("torch._guards.detect_fake_mode", lambda: imp("torch._guards", "detect_fake_mode"))
    has("torch._subclasses.fake_tensor.FakeTensorMode", lambda: imp("torch._subclasses.fake_tensor", "FakeTensorMode"))
    has("torch.fx.node._get_qualified_name", lambda: imp("torch.fx.node", "_get_qualified_name"))
    has("torch.distributed.distributed_c10d._resolve_process_group",
        lambda: imp("torch.distributed.distributed_c10d", "_resolve_process_group"))
    has("torch._logging.trace_structured", lambda: imp("torch._logging", "trace_structured"))
    has("torch.ops.higher_order.cond", lambda: torch.ops.higher_order.cond)
    has("prims.inductor_force_stride_order", lambda: (imp("torch._inductor.inductor_prims", "__name__"),
                                                      torch.ops.prims.inductor_force_stride_order)[1])
    has("torch._prims_common.make_contiguous_strides_for",
        lambda: imp("torch._prims_common", "make_contiguous_strides_for"))
    has("torch._inductor.compile_fx.compile_fx", lambda: imp("torch._inductor.compile_fx", "compile_fx"))
    has("torch._inductor.list_mode_options", lambda: imp("torch._inductor", "list_mode_options"))
    has("torch._inductor.aoti_compile_and_package", lambda: imp("torch._inductor", "aoti_compile_and_package"))
    has("torch._inductor.aoti_load_package", lambda: imp("torch._inductor", "aoti_load_package"))
    has("torch._inductor.config.graph_partition", lambda: imp("torch._inductor.config", "graph_partition"))
    return out


def cudagraphs_in_mode(mode: str | None) -> bool:
    """Whether ``torch.compile``'s ``mode`` turns on Inductor's CUDA graphs
    (``torch._inductor.list_mode_options(mode)["triton.cudagraphs"]``, 2.11-2.15). Missing: False."""
    options = getattr(torch._inductor, "list_mode_options", None)
    return bool(mode) and options is not None and bool(options(mode).get("triton.cudagraphs", False))


def outside_tracing_context():
    """A context manager with no Dynamo tracing context (``torch._guards.tracing(None)``,
    2.11-2.15): a separately compiled piece records its metadata on a fresh context."""
    return torch._guards.tracing(None)


def set_placeholder_source(node: torch.fx.Node, source: Any) -> None:
    """Give a placeholder the Dynamo source record of another (``_dynamo_source``, read by
    AOTAutograd, 2.11-2.15); None marks it as having none."""
    node._dynamo_source = getattr(source, "_dynamo_source", None) if source is not None else None


def copy_param_sources(old: torch.fx.GraphModule, new: torch.nn.Module) -> None:
    """Carry ``_param_name_to_source`` (Dynamo's parameter records, 2.11-2.15) to a piece."""
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source


def reset_compiled_code(code: Any) -> bool:
    """Drop Dynamo's compiled entries of a code object (``torch._C._dynamo.eval_frame.reset_code``,
    2.11-2.15), so that its next call is traced again. Missing: False (nothing dropped)."""
    try:
        from torch._C._dynamo.eval_frame import reset_code
    except ImportError:
        return False
    reset_code(code)
    return True


def optimized_module_class() -> type:
    """``torch._dynamo.eval_frame.OptimizedModule``, the class of what ``torch.compile(module)``
    returns (2.11-2.15)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule
