"""Peers of fastcache applied to a diffusers transformer as their own docs say.

Each peer is applied to a fresh model and returns a :class:`Applied` handle whose ``forward`` has the
``DiTTransformer2DModel`` signature (what ``fastcache_fx.reference.sample`` calls) and whose
``reset()`` starts a new trajectory. Where a peer cannot be applied, :class:`PeerNotApplicable`
carries the reason, which the results table prints instead of dropping the row.

Peers (diffusers 0.42.1 hooks, cache-dit 1.5.x):

- ``fbcache``: diffusers ``FirstBlockCacheConfig(threshold)`` (ParaAttention's First Block Cache).
- ``taylorseer``: diffusers ``TaylorSeerCacheConfig`` (arXiv 2503.06923), the docstring example
  (``cache_interval=5, max_order=1, disable_cache_before_step=3``, fp32 factors) with
  ``cache_identifiers`` naming each block's ``attn1`` and ``ff`` (the default patterns match no
  module of DiT/PixArt).
- ``magcache``: diffusers ``MagCacheConfig`` with ``mag_ratios`` from one calibration run
  (``calibrate=True`` prints the ratios; the docs say to copy them into the config).
- ``fastercache``: diffusers ``FasterCacheConfig`` (arXiv 2410.19355), the docstring example with
  ``tensor_format="BCHW"``; it assumes CFG batches ordered [uncond, cond], so the wrapper reorders
  the sampler's [cond, uncond] batch around the call.
- ``pab``: diffusers ``PyramidAttentionBroadcastConfig`` (arXiv 2408.12588), the docstring example.
- ``dbcache`` / ``dbcache_taylorseer``: cache-dit ``enable_cache(transformer, DBCacheConfig(...))``
  without / with ``TaylorSeerCalibratorConfig``.

diffusers documents its hooks through ``CacheMixin.enable_cache`` and ``model.cache_context(name)``;
``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` do not inherit ``CacheMixin``. The
public ``apply_*`` functions, documented for "external implementations" too, attach the same hooks;
the cache context is then set the way ``CacheMixin.cache_context`` sets it. ``Applied.note`` says so.
"""

from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

DIFFUSERS_PEERS = ("fbcache", "taylorseer", "magcache", "fastercache", "pab")
CACHE_DIT_PEERS = ("dbcache", "dbcache_taylorseer")
PEERS = DIFFUSERS_PEERS + CACHE_DIT_PEERS

#: Peers whose code is written to run under torch.compile (decisions in ``@torch.compiler.disable``
#: functions, or cache-dit's own compile support); the others run eager, for the reason given.
COMPILABLE = ("fbcache", "taylorseer", "magcache", "dbcache", "dbcache_taylorseer")
COMPILABLE_WHY = {
    "fastercache": "its hooks branch on Python state with no torch.compiler.disable boundary "
                   "(compiled, Dynamo guards on that state and recompiles at almost every step)",
    "pab": "its hooks branch on Python state with no torch.compiler.disable boundary "
           "(compiled, Dynamo guards on that state and recompiles at almost every step: 7 of 8 in a test)",
}

#: Human-readable name and library of each peer (the table's "method" column).
LABELS = {
    "fbcache": "FirstBlockCache (diffusers)",
    "taylorseer": "TaylorSeerCache (diffusers)",
    "magcache": "MagCache (diffusers)",
    "fastercache": "FasterCache (diffusers)",
    "pab": "PyramidAttentionBroadcast (diffusers)",
    "dbcache": "DBCache (cache-dit)",
    "dbcache_taylorseer": "DBCache + TaylorSeer (cache-dit)",
}


class PeerNotApplicable(RuntimeError):
    """A peer cannot be applied to this model; ``str(err)`` is the reason shown in the table."""


@dataclass
class Applied:
    """A peer attached to a model.

    Attributes:
        module: the hooked model (compile this one, or leave it eager).
        note: how it was applied, for the table.
        forward: set by :func:`wrap_forward`: ``forward(x [2B,C,H,W], timestep [2B], class_labels [2B])``
            returning an object with ``.sample``.
        reset: forget all cache state (start of a new trajectory).
    """

    module: torch.nn.Module
    note: str
    pre_call: Callable[[torch.Tensor], None] = lambda t: None
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    reset: Callable[[], None] = lambda: None
    swap_cfg_halves: bool = False
    info: dict = field(default_factory=dict)

    def wrap_forward(self, callee):
        """The sampler-facing callable around ``callee`` (the module or its compiled version)."""

        def forward(hidden_states, timestep, class_labels, **kw):
            self.pre_call(timestep)
            if self.swap_cfg_halves:  # the peer expects [uncond, cond]; the sampler batches [cond, uncond]
                hidden_states, timestep, class_labels = (_swap(hidden_states), _swap(timestep), _swap(class_labels))
            with self.context():
                out = callee(hidden_states=hidden_states, timestep=timestep, class_labels=class_labels, **kw)
            if self.swap_cfg_halves:
                out.sample = _swap(out.sample)
            return out

        return forward


def _swap(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2)
    return torch.cat([b, a])


def _has_cache_mixin(model) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(model, CacheMixin)


def _diffusers_context(model):
    """``model.cache_context("cond")`` where the model has CacheMixin, else the same context set by hand."""
    from diffusers.models.cache_utils import CacheMixin

    if _has_cache_mixin(model):
        return lambda: model.cache_context("cond")
    return lambda: CacheMixin.cache_context(model, "cond")  # the same helper, called on a non-mixin model


def _diffusers_reset(model):
    from diffusers.hooks import HookRegistry

    return lambda: HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


def _apply_diffusers(model, config, apply_fn) -> str:
    if _has_cache_mixin(model):
        model.enable_cache(config)
        return "enable_cache"
    apply_fn(model, config)
    return (f"{type(model).__name__} lacks diffusers' CacheMixin (no enable_cache/cache_context): "
            f"applied with the public {apply_fn.__name__}, cache context set as CacheMixin.cache_context does")


class _Timestep:
    """The current timestep for peers that need ``current_timestep_callback`` (FasterCache, PAB)."""

    def __init__(self) -> None:
        self.value = 1000

    def set(self, t: torch.Tensor) -> None:
        self.value = int(t.flatten()[0])

    def __call__(self) -> int:
        return self.value


def apply_peer(name: str, model, *, steps: int, params: dict | None = None,
               calibrate_fn: Callable[[Applied], None] | None = None) -> Applied:
    """Attach peer ``name`` (one of ``PEERS``) to ``model`` (a fresh diffusers transformer).

    Args:
        steps: denoising steps per trajectory (MagCache and cache-dit need it).
        params: the peer's own knob, e.g. ``{"threshold": 0.1}`` (see ``PEER_SWEEPS`` in compare.py).
        calibrate_fn: MagCache only: runs one trajectory through the given handle (eager), so the
            hook can print its ``mag_ratios``.

    Raises:
        ValueError: unknown peer.
        PeerNotApplicable: the peer cannot be attached to this model (reason in the message).
    """
    params = dict(params or {})
    if name not in PEERS:
        raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
    if name in CACHE_DIT_PEERS:
        return _apply_cache_dit(name, model, steps, params)
    import diffusers.hooks as H

    ts = _Timestep()
    if name == "fbcache":
        cfg, fn = H.FirstBlockCacheConfig(threshold=params.get("threshold", 0.05)), H.apply_first_block_cache
    elif name == "taylorseer":
        # the default patterns (fullmatch "^transformer_blocks.*attn") match no DiT/PixArt module (they
        # are named attn1/attn2/ff), so name the block's self-attention and MLP with cache_identifiers
        # (Wan: blocks.N.attn1 / blocks.N.ffn)
        ids = ([r"blocks\.\d+\.attn1", r"blocks\.\d+\.ffn"] if hasattr(model, "blocks") else
               [r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff"])
        cfg = H.TaylorSeerCacheConfig(cache_interval=params.get("cache_interval", 5), max_order=1,
                                      disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                                      cache_identifiers=ids)
        fn = H.apply_taylorseer_cache
    elif name == "magcache":
        ratios = _magcache_ratios(model, steps, calibrate_fn)
        cfg = H.MagCacheConfig(threshold=params.get("threshold", 0.06), num_inference_steps=steps, mag_ratios=ratios)
        fn = H.apply_mag_cache
    elif name == "fastercache":
        # docstring example values; BCHW for image models; the class labels are batched [uncond, cond] too
        cfg = H.FasterCacheConfig(
            spatial_attention_block_skip_range=params.get("skip_range", 2),
            spatial_attention_timestep_skip_range=(-1, 681),
            low_frequency_weight_update_timestep_range=(99, 641),
            high_frequency_weight_update_timestep_range=(-1, 301),
            spatial_attention_block_identifiers=["transformer_blocks"],
            attention_weight_callback=lambda _: 0.3,
            tensor_format="BCHW",
            current_timestep_callback=ts,
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"],
        )
        fn = H.apply_faster_cache
    else:  # pab
        cfg = H.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=params.get("skip_range", 2),
            spatial_attention_timestep_skip_range=(100, 800), current_timestep_callback=ts)
        fn = H.apply_pyramid_attention_broadcast
    try:
        how = _apply_diffusers(model, cfg, fn)
    except Exception as e:  # the peer's own refusal, e.g. no registered block class
        raise PeerNotApplicable(f"{fn.__name__} failed: {type(e).__name__}: {e}") from e
    applied = Applied(model, how, pre_call=ts.set, context=_diffusers_context(model), reset=_diffusers_reset(model),
                      swap_cfg_halves=(name == "fastercache"))
    if name == "taylorseer":
        applied.note += f"; cache_identifiers={'|'.join(ids)} (default patterns match no module here)"
    if name == "fastercache":
        applied.note += "; batch reordered to [uncond, cond] as FasterCache's CFG split assumes"
    if name == "magcache":
        applied.info["mag_ratios"] = [float(r) for r in cfg.mag_ratios]
    return applied


def _magcache_ratios(model, steps, calibrate_fn) -> list[float]:
    """Run MagCache's calibration mode once and read the ratios it prints (its documented workflow)."""
    import diffusers.hooks as H
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    if calibrate_fn is None:
        raise PeerNotApplicable("MagCache needs mag_ratios from a calibration run (no calibrate_fn given)")
    cfg = H.MagCacheConfig(calibrate=True, num_inference_steps=steps)
    _apply_diffusers(model, cfg, H.apply_mag_cache)
    handle = Applied(model, "", context=_diffusers_context(model), reset=_diffusers_reset(model))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        calibrate_fn(handle)
    found = re.findall(r"\[([-0-9.eE, ]+)\]", buf.getvalue())
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.remove_hook(_MAG_CACHE_LEADER_BLOCK_HOOK, recurse=True)
    registry.remove_hook(_MAG_CACHE_BLOCK_HOOK, recurse=True)
    if _has_cache_mixin(model):
        model._cache_config = None
    if not found:
        raise PeerNotApplicable("MagCache calibration printed no ratios")
    return [float(v) for v in found[-1].split(",")]


def _apply_cache_dit(name, model, steps, params) -> Applied:
    try:
        import cache_dit
    except ImportError as e:
        raise PeerNotApplicable("cache-dit is not installed (pip install -e '.[bench]')") from e
    cfg = cache_dit.DBCacheConfig(
        Fn_compute_blocks=params.get("Fn", 1), Bn_compute_blocks=params.get("Bn", 0),
        residual_diff_threshold=params.get("threshold", 0.08), max_warmup_steps=params.get("warmup", 2),
        max_continuous_cached_steps=params.get("max_continuous", 3), num_inference_steps=steps)
    calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if name == "dbcache_taylorseer" else None
    try:
        cache_dit.enable_cache(model, cache_config=cfg, calibrator_config=calib)
    except Exception as e:
        raise PeerNotApplicable(f"cache_dit.enable_cache failed: {type(e).__name__}: {e}") from e

    def reset():
        cache_dit.refresh_context(model, num_inference_steps=steps)

    return Applied(model, "cache_dit.enable_cache(transformer, DBCacheConfig(...)) (transformer-only)", reset=reset)


def summary(applied: Applied, name: str) -> dict:
    """Peer-reported statistics (cache-dit's cached steps), empty where the peer reports none."""
    if name in CACHE_DIT_PEERS:
        try:
            import cache_dit

            with contextlib.redirect_stdout(io.StringIO()):
                s = cache_dit.summary(applied.module)
            s = s[0] if isinstance(s, list) and s else s
            cached = getattr(s, "cached_steps", None)
            return {"cached_steps": list(cached) if cached is not None else None}
        except Exception:  # a statistics failure must not lose the timing
            return {}
    return {}
