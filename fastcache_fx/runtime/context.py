"""The current CFG context name (cond / uncond ...), from diffusers' ``cache_context`` or ours.

Pipelines that call the transformer twice per step wrap each call in
``transformer.cache_context("cond")`` (diffusers CacheMixin). ``attach_diffusers_context``
registers a stateful diffusers hook whose ``StateManager`` receives that context, so the
backend keeps one cache state per context. Models without CacheMixin (DiT, PixArt) can use
``fastcache_fx.cache_context(name)`` directly.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch

_CURRENT: ContextVar[str | None] = ContextVar("fastcache_fx_context", default=None)
DEFAULT_CONTEXT = "default"
HOOK_NAME = "fastcache_fx_context"


def current_context() -> str:
    """The active context name ("default" when none is set)."""
    return _CURRENT.get() or DEFAULT_CONTEXT


@contextlib.contextmanager
def cache_context(name: str):
    """Run transformer calls under context ``name``: each context has its own cache state."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty string, got {name!r}")
    token = _CURRENT.set(name)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def attach_diffusers_context(module, on_reset=None) -> bool:
    """Follow diffusers' ``module.cache_context(name)`` calls; True if the hook was attached.

    Uses diffusers' own HookRegistry: a stateful ModelHook holding a StateManager subclass whose
    ``set_context`` records the name here. The hook sits on a child of ``module`` (diffusers sets
    the context on every registry under the model), not on the model itself: a hook on the model
    would wrap its ``forward`` in diffusers' ``new_forward``, one code object shared by every hooked
    model, so Dynamo would share one recompile limit (and its remembered input sizes) across all of
    them and see the blocks under a ``function_reference`` path. ``on_reset()`` is called when
    diffusers resets stateful hooks (``maybe_free_model_hooks`` at the end of every pipeline call,
    for models with diffusers' CacheMixin): the next call then starts a trajectory. Models without
    CacheMixin (DiT, PixArt) get no hook: pipelines set no context on them. Idempotent.
    """
    if not hasattr(module, "cache_context"):
        return False  # no diffusers CacheMixin: pipelines never set a context on it
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import BaseState, StateManager
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False

    class _ContextRelay(StateManager):
        def set_context(self, context) -> None:
            name = getattr(context, "name", context)
            _CURRENT.set(name if name else None)

    class _ContextHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.relay = _ContextRelay(BaseState)

        def reset_state(self, mod):
            if on_reset is not None:
                on_reset()
            return mod

    children = [m for m in module.children() if not isinstance(m, torch.nn.ModuleList)]
    host = children[-1] if children else module
    registry = HookRegistry.check_if_exists_or_initialize(host)
    if registry.get_hook(HOOK_NAME) is None:
        registry.register_hook(_ContextHook(), HOOK_NAME)
        # the model's registry caches the list of child registries it found
        HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()
    return True


def detach_diffusers_context(module) -> None:
    """Remove the hook ``attach_diffusers_context`` added under ``module`` (``disable_fastcache``);
    nothing where there is none."""
    hooked = [m for m in module.modules() if getattr(m, "_diffusers_hook", None) is not None]
    for m in hooked:
        if m._diffusers_hook.get_hook(HOOK_NAME) is not None:
            m._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    if getattr(module, "_diffusers_hook", None) is not None:
        module._diffusers_hook.invalidate_child_registries_cache()
