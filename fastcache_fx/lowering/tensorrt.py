"""TensorRT lowering (optional extra ``fastcache-fx[tensorrt]``, CUDA only).

TensorRT has no cond converter, so the plan (issue #7) is one engine per branch with the choice
made by our runtime. Until that lands, ``lowering="tensorrt"`` raises a clear error.
"""

from __future__ import annotations


def require_tensorrt() -> None:
    """Check that TensorRT lowering can run here.

    Raises:
        RuntimeError: saying what is missing (CUDA, the torch_tensorrt package) or that the
            per-branch engine lowering is not implemented yet.
    """
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("fastcache: lowering='tensorrt' needs CUDA, and no CUDA device is available")
    if importlib.util.find_spec("torch_tensorrt") is None:
        raise RuntimeError("fastcache: lowering='tensorrt' needs torch_tensorrt: pip install fastcache-fx[tensorrt]")
    raise RuntimeError("fastcache: lowering='tensorrt' (one engine per branch) is not implemented yet; "
                       "use lowering='inductor'")
