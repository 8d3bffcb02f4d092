"""Mixture-of-experts feed-forwards that route tokens on host values, made one opaque op.

HiDream's ``MOEFeedForwardSwiGLU`` (inference path ``moe_infer``) counts the tokens per expert
with ``bincount().cpu().numpy()`` and loops over the counts: Dynamo breaks the graph there, inside
every block, so no graph holds a whole block and nothing could be cached. ``make_opaque_moe``
replaces the forward of each such layer with one custom op (``fastcache::expert_ffn``) that runs
the layer eagerly: the block traces whole, the op computes exactly what the layer computes
(same code, same weights), and Inductor calls it as an extern kernel. Inference only (no
autograd through the op).
"""

from __future__ import annotations

import inspect
import itertools
import weakref

import torch

_LAYERS: dict[int, weakref.ref] = {}
_IDS = itertools.count()


@torch.library.custom_op("fastcache::expert_ffn", mutates_args=())
def expert_ffn(x: torch.Tensor, layer: int) -> torch.Tensor:
    """Run the registered MoE layer ``layer`` on ``x`` [B, N, D] eagerly; returns [B, N, D].

    Raises:
        RuntimeError: the layer was garbage-collected.
    """
    module = _LAYERS[layer]()
    if module is None:
        raise RuntimeError(f"fastcache::expert_ffn: layer {layer} no longer exists")
    with torch.no_grad():
        return module._fastcache_forward(x).clone()


@expert_ffn.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(x)


def routes_on_host(module: torch.nn.Module) -> bool:
    """True for a mixture-of-experts layer (a ``gate`` and a ``ModuleList`` of ``experts``)
    whose class reads routing values on the host (``.numpy()`` / ``.tolist()``)."""
    if not (hasattr(module, "gate") and isinstance(getattr(module, "experts", None), torch.nn.ModuleList)):
        return False
    try:
        src = inspect.getsource(type(module))
    except (OSError, TypeError):
        return False
    return ".numpy()" in src or ".tolist()" in src


def make_opaque_moe(model: torch.nn.Module) -> list[str]:
    """Replace the forward of every ``routes_on_host`` layer of ``model`` (one tensor in, one
    tensor of the same shape out) by ``fastcache::expert_ffn``; returns their names. Idempotent."""
    names = []
    for name, m in model.named_modules():
        if not routes_on_host(m):
            continue
        names.append(name)
        if "_fastcache_forward" in m.__dict__:
            continue
        key = next(_IDS)
        _LAYERS[key] = weakref.ref(m)
        m._fastcache_forward = m.forward
        m.forward = lambda x, _key=key: expert_ffn(x, _key)
    return names


def restore_moe(model: torch.nn.Module) -> None:
    """Undo ``make_opaque_moe``: every replaced layer gets its own forward back."""
    for m in model.modules():
        if "_fastcache_forward" in m.__dict__:
            del m.__dict__["forward"]
            del m.__dict__["_fastcache_forward"]
