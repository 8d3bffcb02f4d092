"""Sampling the reference MMDiT with the real ``diffusers.StableDiffusion3Pipeline``.

The pipeline is built with its three text encoders and tokenizers set to ``None`` and fed
``prompt_embeds`` / ``pooled_prompt_embeds`` (and the negative pair, from the learned null class)
by ``ClassEmbedder``; classifier-free guidance is the pipeline's own batched CFG
(``noise_uncond + w (noise_cond - noise_uncond)``, one transformer call on [2B] per step).

VAE: the model works in pixel space, so ``vae=None`` and ``output_type="latent"`` (the pipeline
returns its "latents", which are the images; ``vae.decode`` is never called). Without a VAE the
pipeline takes ``vae_scale_factor = 8`` (its fallback), so ``height`` and ``width`` are given in
"pixels" of that imaginary VAE, 16 * 8 = 128 (they must be divisible by ``vae_scale_factor *
patch_size`` = 16). The initial noise is passed as ``latents`` [B, 1, 16, 16], drawn per sample
from its own seed (``sampling.initial_noise``), so a sample does not depend on the batch.

Timesteps: ``FlowMatchEulerDiscreteScheduler`` gives sigmas in (0, 1] and timesteps sigma * 1000,
which the pipeline passes to the transformer unchanged (0..1000): ``FastCacheConfig``'s default
``timestep_max=1000`` fits.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .mmdit import IMAGE_SIZE, NUM_DIGITS, flow_scheduler_config
from .sampling import initial_noise, pipeline_step_callback, sample_seeds


def make_flow_scheduler(config: dict | None = None):
    """A diffusers ``FlowMatchEulerDiscreteScheduler`` from ``config`` (default: the bundled model's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(config or flow_scheduler_config()))


def build_pipeline(transformer, scheduler=None, progress: bool = False):
    """A ``StableDiffusion3Pipeline`` around ``transformer`` with no VAE, text encoders or tokenizers.

    ``transformer`` may be the eager ``SD3Transformer2DModel`` or the module compiled by
    Inductor or ``backend="fastcache"`` (``fastcache_fx.enable_fastcache(pipe)`` also works on
    the returned pipeline).
    """
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or make_flow_scheduler(), vae=None,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    return pipe


@torch.no_grad()
def sample_mmdit(
    pipe_or_transformer,
    embedder,
    class_labels: Sequence[int] | torch.Tensor,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.0,
    seed: int | Sequence[int] = 0,
    progress: bool = False,
    callback=None,
) -> torch.Tensor:
    """Generate digits with the real SD3 pipeline and batched CFG (rectified flow, Euler steps).

    Euler integration of dx/dsigma = v(x, sigma) from sigma = 1 (noise) to 0 (data) on the
    scheduler's sigma grid, v = noise - x0 as in training (Liu et al. 2022, arXiv 2209.03003;
    Esser et al. 2024, arXiv 2403.03206).

    Args:
        pipe_or_transformer: a ``StableDiffusion3Pipeline`` (e.g. after
            ``fastcache_fx.enable_fastcache(pipe)``) or a transformer (eager or compiled), called
            as ``transformer(hidden_states [2B,1,16,16], timestep [2B] in 0..1000,
            encoder_hidden_states [2B,4,64], pooled_projections [2B,64])``.
        embedder: the ``ClassEmbedder`` shipped with the model.
        class_labels: B requested classes in 0..9.
        guidance_scale: CFG weight w (1 disables CFG: one transformer call on [B] per step).
        seed: one int (sample i uses ``seed + i``) or B ints.
        callback: optional ``callback(step_index, timestep)`` after each step.

    Returns:
        images [B, 1, 16, 16] float32, clamped to [-1, 1].

    Raises:
        ValueError: bad label, step count, guidance scale or seed count.
    """
    from diffusers import StableDiffusion3Pipeline

    labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_DIGITS:
        raise ValueError(f"class_labels: expected values in 0..{NUM_DIGITS - 1}")
    if int(num_inference_steps) < 1:
        raise ValueError("num_inference_steps: must be >= 1")
    if not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale: expected >= 1, got {guidance_scale!r}")
    seeds = sample_seeds(seed, labels.numel())
    if isinstance(pipe_or_transformer, StableDiffusion3Pipeline):
        pipe = pipe_or_transformer
        pipe.set_progress_bar_config(disable=not progress, desc="sampling", leave=False)
    else:
        pipe = build_pipeline(pipe_or_transformer, progress=progress)
    kwargs = embedder.prompt_kwargs(labels)
    if guidance_scale == 1.0:
        kwargs.pop("negative_prompt_embeds")
        kwargs.pop("negative_pooled_prompt_embeds")
    size = IMAGE_SIZE * pipe.vae_scale_factor  # "pixels" of the absent VAE: latents are 16x16
    out = pipe(**kwargs, latents=initial_noise(seeds, (1, IMAGE_SIZE, IMAGE_SIZE)), height=size, width=size,
               num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
               output_type="latent", return_dict=False, callback_on_step_end=pipeline_step_callback(callback))[0]
    return out.float().clamp(-1, 1)
