"""Batched classifier-free-guidance sampling with diffusers schedulers.

Works with any callable with the ``DiTTransformer2DModel`` signature: the eager module, the
module compiled by Inductor, or by ``backend="fastcache"``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .model import NULL_CLASS
from .model import scheduler_config as bundled_scheduler_config

SCHEDULERS = ("ddim", "dpmsolver", "euler", "unipc")


def make_scheduler(name: str = "ddim", config: dict | None = None):
    """A diffusers scheduler built from the reference noise-schedule config.

    Raises:
        ValueError: ``name`` is not one of ``SCHEDULERS``.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

    classes = {"ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler,
               "unipc": UniPCMultistepScheduler}
    if name not in classes:
        raise ValueError(f"scheduler: expected one of {SCHEDULERS}, got {name!r}")
    cfg = dict(config or bundled_scheduler_config())
    if name != "ddim":
        cfg.pop("clip_sample", None)
    return classes[name].from_config(cfg)


def sample_seeds(seed, b: int) -> list[int]:
    """One seed per sample: ``seed + i`` for an int ``seed``, else the ``b`` given ones.

    Raises:
        ValueError: a sequence of another length than ``b``."""
    seeds = [seed + i for i in range(b)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != b:
        raise ValueError(f"seed: expected {b} seeds, got {len(seeds)}")
    return seeds


def pipeline_step_callback(callback):
    """A diffusers pipeline's ``callback_on_step_end`` that calls ``callback(step_index, timestep)``
    and changes nothing (None for no callback)."""
    if callback is None:
        return None

    def on_step(_pipe, i, t, tensors):
        callback(i, t)
        return {}
    return on_step


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    """x_T [B, *shape]: sample i is drawn from its own generator seeded with ``seeds[i]``,
    so a sample does not depend on what else is in the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample(
    transformer,
    class_labels: Sequence[int] | torch.Tensor,
    num_inference_steps: int = 50,
    guidance_scale: float = 2.0,
    scheduler: str = "ddim",
    seed: int | Sequence[int] = 0,
    progress: bool = False,
    callback=None,
    scheduler_config: dict | None = None,
    image_size: int = 8,
    cfg: str = "batched",
) -> torch.Tensor:
    """Generate digits with batched CFG.

    Args:
        transformer: called as ``transformer(x [2B,1,8,8], timestep=[2B], class_labels=[2B]).sample``.
        class_labels: B requested classes in 0..9.
        seed: one int (sample i uses ``seed + i``) or B ints.
        callback: optional ``callback(step_index, timestep)`` after each step.
        scheduler_config: the noise schedule (diffusers config keys); default the bundled DiT's.
        image_size: side S of the samples in pixels (8, or 16 for ``model.COSINE_NAME``).
        cfg: "batched" (one call on [2B] per step) or "separate" (a "cond" and an "uncond" call
            on [B] each, under ``fastcache_fx.cache_context``, as Wan's pipeline calls them).

    Returns:
        images [B, 1, S, S] float32 in [-1, 1].

    Raises:
        ValueError: bad scheduler name, step count or label.
    """
    from tqdm.auto import tqdm

    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NULL_CLASS:
        raise ValueError(f"class_labels: expected values in 0..{NULL_CLASS - 1}")
    if int(num_inference_steps) < 1:
        raise ValueError("num_inference_steps: must be >= 1")
    if cfg not in ("batched", "separate"):
        raise ValueError(f"cfg: expected 'batched' or 'separate', got {cfg!r}")
    b = labels.numel()
    seeds = sample_seeds(seed, b)
    sched = make_scheduler(scheduler, scheduler_config)
    sched.set_timesteps(int(num_inference_steps))
    from ..api import set_sampler

    set_sampler(transformer, sched, guidance_scale)  # a model with target_psnr spends it on the final sample
    x = initial_noise(seeds, (1, image_size, image_size)) * sched.init_noise_sigma
    cfg_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    it = sched.timesteps
    for i, t in enumerate(tqdm(it, desc="sampling", leave=False, disable=not progress)):
        if cfg == "separate":
            from ..runtime.context import cache_context

            xin = sched.scale_model_input(x, t)
            tt = t.expand(b).contiguous()
            with cache_context("cond"):
                cond = transformer(xin, timestep=tt, class_labels=labels).sample
            with cache_context("uncond"):
                uncond = transformer(xin, timestep=tt, class_labels=cfg_labels[b:]).sample
        else:
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            tt = t.expand(2 * b).contiguous() if t.ndim == 0 else t
            out = transformer(xin, timestep=tt, class_labels=cfg_labels).sample
            cond, uncond = out.chunk(2)
        guided = uncond + guidance_scale * (cond - uncond)
        x = sched.step(guided, t, x).prev_sample
        if callback is not None:
            callback(i, t)
    return x.clamp(-1, 1)
