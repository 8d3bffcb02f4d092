"""TensorRT lowering (optional extra ``fastcache-fx[tensorrt]``, CUDA only).

TensorRT has no cond converter (Torch-TensorRT would run every ``torch.cond`` in PyTorch), so
the rewritten graph is split (``lowering.split``): the glue between blocks and each block's
full branch and approximation branch become separate Torch-TensorRT engines, and our runtime
(``SplitProgram``, or ``ExportedTransformer`` for exports) evaluates the block decision from
the glue engine's output and runs one of the two branch engines. Parameters are baked into the
engines when they are built (call ``torch.compile``/``export`` again after changing weights).

``torch_tensorrt`` is imported lazily: importing fastcache_fx never needs it.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import fx

from .engine_format import EngineFormat


def require_tensorrt(what: str = "lowering='tensorrt'"):
    """Check that TensorRT lowering can run here and return the ``torch_tensorrt`` module.

    Args:
        what: the feature named in the error message.

    Raises:
        RuntimeError: saying what is missing (CUDA, or the torch_tensorrt package).
    """
    import importlib
    import importlib.util

    if not torch.cuda.is_available():
        raise RuntimeError(f"fastcache: {what} needs CUDA, and no CUDA device is available "
                           "(use lowering='inductor' / format='aotinductor' on this machine)")
    if importlib.util.find_spec("torch_tensorrt") is None:
        raise RuntimeError(f"fastcache: {what} needs the torch_tensorrt package: pip install fastcache-fx[tensorrt]")
    try:
        return importlib.import_module("torch_tensorrt")
    except Exception as e:  # a broken install (TensorRT libraries missing, version mismatch)
        raise RuntimeError(f"fastcache: {what}: torch_tensorrt is installed but cannot be imported: {e}") from e


def _supported(fn, **kwargs) -> dict:
    """Only the keyword arguments ``fn`` accepts (names changed across Torch-TensorRT releases)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}  # named ones only, even with **kwargs


def trt_engine(gm: fx.GraphModule, example_inputs: list, name: str):
    """Engine compiler for ``lowering.split``: one piece -> a Torch-TensorRT GraphModule.

    ``torch.export`` of the piece, then ``torch_tensorrt.dynamo.compile`` with static shapes
    (the example inputs), the inputs' dtypes (explicit typing; ``enabled_precisions`` on older
    releases), and ``min_block_size=1`` so that small glue pieces are converted too (ops without
    a converter still fall back to PyTorch).

    Raises:
        RuntimeError: no CUDA or no torch_tensorrt.
    """
    trt = require_tensorrt()
    ep = torch.export.export(gm, tuple(example_inputs), strict=False)
    kwargs = _supported(trt.dynamo.compile, arg_inputs=list(example_inputs), min_block_size=1,
                        truncate_double=True, truncate_long_and_double=True)
    try:
        explicit = "use_explicit_typing" in inspect.signature(trt.dynamo.compile).parameters
    except (TypeError, ValueError):
        explicit = False
    if not explicit:  # releases before explicit typing: allow the inputs' float precisions
        floats = {x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()}
        kwargs.update(_supported(trt.dynamo.compile, enabled_precisions=floats | {torch.float32}))
    return trt.dynamo.compile(ep, **kwargs)


class TensorRTFormat(EngineFormat):
    """``export(format="tensorrt")``: pieces built by ``trt_engine``, saved with
    ``torch_tensorrt.save`` as ExportedPrograms (loaded with ``torch.export.load`` once
    ``torch_tensorrt`` is imported)."""

    name = "torch_tensorrt"
    requires = ("torch_tensorrt",)

    def compile(self, gm: fx.GraphModule, example_inputs: list, name: str):
        return trt_engine(gm, example_inputs, name)

    def save(self, engine, gm: fx.GraphModule, example_inputs: list, path: Path) -> None:
        trt = require_tensorrt()
        kwargs = _supported(trt.save, output_format="exported_program", arg_inputs=list(example_inputs))
        trt.save(engine, str(path), **kwargs)


def compile_tensorrt(gm: fx.GraphModule, example_inputs: list, block_names=None):
    """``lowering="tensorrt"`` in the backend: split ``gm`` and build one engine per piece.

    Args:
        gm: output of ``apply_block_cache``; ``example_inputs`` one real value per placeholder;
        block_names: ``BlockCacheResult.blocks``.

    Returns:
        a ``SplitProgram`` called like ``gm`` (parameter inputs ignored: baked into engines).

    Raises:
        RuntimeError: no CUDA or no torch_tensorrt.
    """
    from .split import compile_split

    require_tensorrt()
    return compile_split(gm, example_inputs, trt_engine, block_names)
