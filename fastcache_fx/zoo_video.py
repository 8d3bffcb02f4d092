"""Real diffusers text-to-video pipelines from tiny random parts, built offline.

The video counterpart of ``zoo.pipeline``: each family's diffusers pipeline class with a tiny
random transformer (2 blocks unless told), a tiny VAE and a real scheduler, no tokenizer and no
text encoder (the prompt embeddings, their masks and their negatives are given), classifier-free
guidance on and ``output_type="latent"`` (the VAE never decodes). Nothing is downloaded.

How each pipeline calls its transformer per denoising step (diffusers 0.42.1), with CFG:

- wan (``WanPipeline``): 2 calls, batch 1 each, under ``transformer.cache_context("cond")`` then
  ``("uncond")`` (with ``step_index``, ``sigma``, ``num_inference_steps`` passed along).
- wan22 (``WanPipeline`` with ``transformer_2`` and ``boundary_ratio=0.5``): the same 2 calls, on
  ``transformer`` (high-noise expert) while t >= 0.5 x 1000 train timesteps, then on
  ``transformer_2`` (low-noise expert, with its own ``guidance_scale_2``).
- hunyuanvideo15 (``HunyuanVideo15Pipeline``): 2 calls, batch 1 each, driven by its
  ``ClassifierFreeGuidance`` guider, under ``cache_context("pred_cond")`` then ``("pred_uncond")``.
- ltx (``LTXPipeline``), cogvideox (``CogVideoXPipeline``): 1 call on the batch [uncond, cond]
  under ``cache_context("cond_uncond")``.

HunyuanVideo 1.5 needs no image encoder for text-to-video: the pipeline itself passes all-zero
``image_embeds`` (729 tokens), which the transformer masks out.
"""

from __future__ import annotations

from typing import Callable

import torch

VIDEO_FAMILIES = ("wan", "wan22", "hunyuanvideo15", "ltx", "cogvideox")

#: (frame step, pixel multiple): frames must be ``1 + k * step`` (the VAE's temporal compression;
#: the frame count of the latents is ``1 + k``) and sizes a multiple of VAE factor x patch size
#: (LTX: 32, which ``LTXPipeline.check_inputs`` demands whatever the VAE's factor, here 4).
VIDEO_RULES = {"wan": (4, 16), "wan22": (4, 16), "hunyuanvideo15": (2, 4), "ltx": (4, 32), "cogvideox": (4, 16)}

#: frame counts and pixel sizes known to run for each family (a few of the valid ones)
VIDEO_SIZE = {"wan": ((5, 9), (16, 32)), "wan22": ((5, 9), (16, 32)), "hunyuanvideo15": ((5, 9), (16, 32)),
              "ltx": ((9, 17), (32, 64)), "cogvideox": ((5, 9), (16, 32))}


def video_pipeline(family: str, seed: int = 0, steps: int = 4, num_layers: int | None = None):
    """(pipeline, call kwargs): the family's diffusers video pipeline built offline, with CFG on.

    The kwargs hold ``prompt_embeds`` [1, text tokens, text dim] and ``negative_prompt_embeds``
    plus whatever the pipeline needs besides (LTX: ``prompt_attention_mask`` [1, tokens];
    HunyuanVideo 1.5: ``prompt_embeds_mask`` and a second, ByT5-like text stream
    ``prompt_embeds_2`` / ``prompt_embeds_mask_2``, with their negatives),
    ``num_inference_steps=steps``, ``guidance_scale`` > 1 (HunyuanVideo 1.5 has no such argument:
    its guider ``pipe.guider`` holds the scale, 6.0) and ``output_type="latent"``. Call it with
    ``run_video_pipeline``. ``num_layers``: transformer blocks (None: 2). Models are in eval mode
    with gradients off; ``seed`` seeds the weights and the embeddings (Wan 2.2's second expert:
    ``seed + 1``).

    Raises:
        ValueError: unknown family.
    """
    if family not in _PIPELINES:
        raise ValueError(f"family: expected one of {VIDEO_FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    pipe, kwargs = _PIPELINES[family](num_layers or 2, seed)
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return pipe, dict(kwargs, num_inference_steps=steps, output_type="latent")


def run_video_pipeline(pipe, kwargs: dict, frames: int, size: int, seed: int = 0, **overrides):
    """``pipe(**kwargs, **overrides)`` for ``frames`` frames of ``size`` x ``size`` pixels with a
    generator seeded ``seed``; returns the pipeline's ``frames`` (for ``output_type="latent"``
    the final latents, batch B = 1, latent frames F' = 1 + (frames - 1) / frame step):

    - wan, wan22: [B, 16, F', size/8, size/8]
    - hunyuanvideo15: [B, 4, F', size/4, size/4]
    - ltx: packed tokens [B, F' * (size/4)^2, 8]
    - cogvideox: frames first, [B, F', 4, size/8, size/8]

    Raises:
        ValueError: ``frames`` not 1 + a multiple of the family's frame step, or ``size`` not a
            multiple of its pixel multiple (``VIDEO_RULES``); the pipelines would round or fail;
            ``pipe`` not built by ``video_pipeline``.
    """
    family = _family_of(pipe)
    step, multiple = VIDEO_RULES[family]
    if frames < 1 or (frames - 1) % step:
        raise ValueError(f"frames: {family} needs 1 + a multiple of {step}, got {frames}")
    if size <= 0 or size % multiple:
        raise ValueError(f"size: {family} needs a multiple of {multiple}, got {size}")
    args = dict(kwargs, num_frames=frames, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), **overrides)
    return pipe(**args).frames


def _family_of(pipe) -> str:
    name = type(pipe).__name__
    if name == "WanPipeline":
        return "wan22" if pipe.transformer_2 is not None else "wan"
    names = {"HunyuanVideo15Pipeline": "hunyuanvideo15", "LTXPipeline": "ltx", "CogVideoXPipeline": "cogvideox"}
    if name not in names:
        raise ValueError(f"pipe: not a zoo_video pipeline: {name}")
    return names[name]


def _embeds(tokens: int, dim: int, mask: str | None = None, suffix: str = "") -> dict:
    """Random ``prompt_embeds{suffix}`` [1, tokens, dim] and negatives; with ``mask`` also all-one
    masks [1, tokens] named ``prompt_{mask}{suffix}`` / ``negative_prompt_{mask}{suffix}``."""
    out = {}
    for pre in ("", "negative_"):
        out[f"{pre}prompt_embeds{suffix}"] = torch.randn(1, tokens, dim)
        if mask:
            out[f"{pre}prompt_{mask}{suffix}"] = torch.ones(1, tokens, dtype=torch.long)
    return out


# Wan 2.1 / 2.2 ------------------------------------------------------------------------------------

def _wan_transformer(layers: int):
    from diffusers import WanTransformer3DModel

    # rotary tables for 32 positions per axis: up to 32 latent frames (125 frames) and 512 pixels

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32)


def _wan_parts(layers: int, flow_shift: float):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    # z_dim 16, 8x spatial and 4x temporal compression (the defaults of scale_factor_*)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    return vae, sched, _wan_transformer(layers)


def _pipe_wan(layers, seed):
    from diffusers import WanPipeline

    vae, sched, tr = _wan_parts(layers, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=tr)
    return pipe, dict(_embeds(8, 32), guidance_scale=5.0)


def _pipe_wan22(layers, seed):
    from diffusers import WanPipeline

    # flow shift 1: timesteps spread evenly over (0, 1000], so the boundary falls mid-run
    # (3 steps: t = 999, 667 | 333; 4 steps: 999, 750, 500 | 250); shift 3 keeps 3 steps >= 600
    vae, sched, tr = _wan_parts(layers, flow_shift=1.0)
    torch.manual_seed(seed + 1)
    tr2 = _wan_transformer(layers)  # the low-noise expert
    # timesteps t >= 0.5 * 1000 run `transformer` (high noise), the rest `transformer_2`
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=tr,
                       transformer_2=tr2, boundary_ratio=0.5)
    torch.manual_seed(seed)
    return pipe, dict(_embeds(8, 32), guidance_scale=4.0, guidance_scale_2=3.0)


# HunyuanVideo 1.5 ---------------------------------------------------------------------------------

def _pipe_hunyuanvideo15(layers, seed):
    from diffusers import (AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline,
                           HunyuanVideo15Transformer3DModel)
    from diffusers.guiders import ClassifierFreeGuidance

    # in_channels 9 = latents 4 + zero condition latents 4 + zero mask 1 (text-to-video)
    tr = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                          patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=12,
                                          rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v")
    # 4x spatial, 2x temporal compression. Note: the ByT5 projection (context_embedder_2) has a
    # fixed 2048 hidden width, 4.2M of the transformer's 4.3M parameters.
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=2,
                                      downsample_match_channel=False, upsample_match_channel=False)
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                  transformer=tr, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))
    # Qwen2.5-VL stream (dim 16) and ByT5 glyph stream (dim 32), each with a mask
    return pipe, dict(_embeds(8, 16, mask="embeds_mask"), **_embeds(6, 32, mask="embeds_mask", suffix="_2"))


# LTX-Video ----------------------------------------------------------------------------------------

def _pipe_ltx(layers, seed):
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)

    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                    num_layers=layers, caption_channels=32)
    # 4 levels, two of them scaling: 4x spatial, 4x temporal compression (the real VAE: 32x, 8x)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1,
                                patch_size_t=1, encoder_causal=True, decoder_causal=False)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                       transformer=tr)
    return pipe, dict(_embeds(8, 32, mask="attention_mask"), guidance_scale=3.0)


# CogVideoX ----------------------------------------------------------------------------------------

def _pipe_cogvideox(layers, seed):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    # sin-cos positions are recomputed for other sizes; the text part of the position table is
    # max_text_seq_length long, so prompt embeddings must have exactly that many tokens
    tr = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
                                     time_embed_dim=2, text_embed_dim=32, num_layers=layers, sample_width=2,
                                     sample_height=2, sample_frames=9, patch_size=2, temporal_compression_ratio=4,
                                     max_text_seq_length=16)
    # 4 levels: 8x spatial, 4x temporal compression
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr, scheduler=DDIMScheduler())
    return pipe, dict(_embeds(16, 32), guidance_scale=6.0)


_PIPELINES: dict[str, Callable] = {"wan": _pipe_wan, "wan22": _pipe_wan22, "hunyuanvideo15": _pipe_hunyuanvideo15,
                                   "ltx": _pipe_ltx, "cogvideox": _pipe_cogvideox}
