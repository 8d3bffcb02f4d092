"""Sampling the reference Wan model with the real ``diffusers.WanPipeline``.

The pipeline is built with ``tokenizer=None, text_encoder=None, vae=None`` and fed
``prompt_embeds`` / ``negative_prompt_embeds`` by ``PromptEmbedder``. Classifier-free guidance is
Wan's own: two transformer calls per step, under ``transformer.cache_context("cond")`` and
``("uncond")`` (one fastcache state each), ``noise_uncond + w (noise_cond - noise_uncond)``.

VAE: the model works in pixel space, so ``output_type="latent"`` returns the frames. Without a
VAE the pipeline takes 4x temporal and 8x spatial compression (its fallback), so a clip of
``FRAMES`` = 4 latent frames of 12x12 is asked for as ``num_frames = 4 (F - 1) + 1 = 13`` and
``height = width = 96``. The initial noise is passed as ``latents`` [B, 1, 4, 12, 12], drawn per
sample from its own seed, so a sample does not depend on the batch.

Timesteps: ``UniPCMultistepScheduler`` with flow sigmas gives timesteps sigma * 1000, which the
pipeline passes to the transformer (0..1000): ``FastCacheConfig``'s ``timestep_max=1000`` fits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .sampling import initial_noise, pipeline_step_callback, sample_seeds
from .wan import CANVAS, FRAMES, MOTIONS, NUM_DIGITS, wan_scheduler_config


def make_wan_scheduler(config: dict | None = None):
    """A diffusers ``UniPCMultistepScheduler`` from ``config`` (default: the bundled model's)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(dict(config or wan_scheduler_config()))


def build_wan_pipeline(transformer, scheduler=None, progress: bool = False):
    """A ``WanPipeline`` around ``transformer`` with no VAE, text encoder or tokenizer.

    ``transformer`` may be the eager ``WanTransformer3DModel`` or a compiled one
    (``fastcache_fx.enable_fastcache(pipe)`` also works on the returned pipeline)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=scheduler or make_wan_scheduler())
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


@torch.no_grad()
def sample_wan(
    pipe_or_transformer,
    embedder,
    digits: Sequence[int] | torch.Tensor,
    motions: Sequence[int] | torch.Tensor,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int | Sequence[int] = 0,
    progress: bool = False,
    callback=None,
) -> torch.Tensor:
    """Generate moving-digit clips with the real Wan pipeline (rectified flow, UniPC steps).

    The model predicts v = noise - x0 (flow prediction, as in training; Liu et al. 2022, arXiv
    2209.03003); UniPC (Zhao et al. 2023, arXiv 2302.04867) integrates it from sigma = 1 to 0.

    Args:
        pipe_or_transformer: a ``WanPipeline`` (e.g. after ``fastcache_fx.enable_fastcache(pipe)``)
            or a transformer called as ``transformer(hidden_states [B,1,4,12,12], timestep [B] in
            0..1000, encoder_hidden_states [B,4,64])``.
        embedder: the ``PromptEmbedder`` shipped with the model.
        digits: B digit classes in 0..9; motions: B motion indices into ``wan.MOTION_NAMES``.
        guidance_scale: CFG weight w (1 disables CFG: one transformer call per step).
        seed: one int (sample i uses ``seed + i``) or B ints.
        callback: optional ``callback(step_index, timestep)`` after each step.

    Returns:
        clips [B, 1, 4, 12, 12] float32, clamped to [-1, 1].

    Raises:
        ValueError: bad digit, motion, step count, guidance scale or seed count.
    """
    from diffusers import WanPipeline

    d = torch.as_tensor(digits, dtype=torch.long).flatten()
    m = torch.as_tensor(motions, dtype=torch.long).flatten()
    if d.numel() == 0 or d.min() < 0 or d.max() >= NUM_DIGITS:
        raise ValueError(f"digits: expected values in 0..{NUM_DIGITS - 1}")
    if m.shape != d.shape or m.min() < 0 or m.max() >= len(MOTIONS):
        raise ValueError(f"motions: expected {d.numel()} values in 0..{len(MOTIONS) - 1}")
    if int(num_inference_steps) < 1:
        raise ValueError("num_inference_steps: must be >= 1")
    if not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale: expected >= 1, got {guidance_scale!r}")
    seeds = sample_seeds(seed, d.numel())
    pipe = pipe_or_transformer if isinstance(pipe_or_transformer, WanPipeline) else \
        build_wan_pipeline(pipe_or_transformer, progress=progress)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    kwargs = embedder.prompt_kwargs(d, m)
    out = pipe(**kwargs, latents=initial_noise(seeds, (1, FRAMES, CANVAS, CANVAS)),
               num_frames=pipe.vae_scale_factor_temporal * (FRAMES - 1) + 1,
               height=CANVAS * pipe.vae_scale_factor_spatial, width=CANVAS * pipe.vae_scale_factor_spatial,
               num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
               output_type="latent", return_dict=False, callback_on_step_end=pipeline_step_callback(callback))[0]
    return out.float().clamp(-1, 1)
