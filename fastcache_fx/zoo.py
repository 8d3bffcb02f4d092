"""Small and full-size configs of the supported diffusers DiT families, with example inputs.

Used by the tests, the benchmarks and ``fastcache-fx explain``: every model here is the real
diffusers class built from a config with random weights (nothing is downloaded).
"""

from __future__ import annotations

from typing import Callable

import torch

FAMILIES = ("dit", "pixart", "sd3", "flux", "sana")


def build(family: str, size: str = "tiny", batch: int = 2, seed: int = 0, num_layers: int | None = None):
    """(model in eval mode, example kwargs) for ``family`` in FAMILIES.

    size "tiny" is for tests (seconds to compile); "xl" is the DiT-XL/2 / PixArt-Sigma scale
    used by the benchmarks.

    Raises:
        ValueError: unknown family or size.
    """
    if family not in _BUILDERS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    if size not in ("tiny", "xl"):
        raise ValueError(f"size: expected 'tiny' or 'xl', got {size!r}")
    torch.manual_seed(seed)
    model, kwargs = _BUILDERS[family](size, batch, num_layers)
    return model.eval().requires_grad_(False), kwargs


def _dit(size, b, L):
    from diffusers import DiTTransformer2DModel

    if size == "xl":
        cfg = dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=L or 28,
                   attention_head_dim=72, num_attention_heads=16, num_embeds_ada_norm=1000)
    else:
        cfg = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=L or 2,
                   attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)
    m = DiTTransformer2DModel(**cfg)
    s = cfg["sample_size"]
    return m, dict(hidden_states=torch.randn(b, cfg["in_channels"], s, s),
                   timestep=torch.full((b,), 500, dtype=torch.long),
                   class_labels=torch.arange(b) % 10)


def _pixart(size, b, L):
    from diffusers import PixArtTransformer2DModel

    if size == "xl":  # PixArt-Sigma 512px: 64x64 latents, patch 2 -> 1024 tokens
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                   num_layers=L or 28, cross_attention_dim=1152, sample_size=64, patch_size=2,
                   caption_channels=4096, use_additional_conditions=False, interpolation_scale=1)
        text = 300
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                   num_layers=L or 2, cross_attention_dim=16, sample_size=8, patch_size=2,
                   caption_channels=12, use_additional_conditions=False, norm_num_groups=1)
        text = 5
    m = PixArtTransformer2DModel(**cfg)
    s = cfg["sample_size"]
    return m, dict(hidden_states=torch.randn(b, 4, s, s),
                   encoder_hidden_states=torch.randn(b, text, cfg["caption_channels"]),
                   timestep=torch.full((b,), 500, dtype=torch.long))


def _sd3(size, b, L):
    from diffusers import SD3Transformer2DModel

    cfg = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=L or 2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
               pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
    m = SD3Transformer2DModel(**cfg)
    return m, dict(hidden_states=torch.randn(b, 4, 8, 8), encoder_hidden_states=torch.randn(b, 6, 12),
                   pooled_projections=torch.randn(b, 10), timestep=torch.full((b,), 500.0))


def _flux(size, b, L):
    from diffusers import FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=8, num_layers=L or 1, num_single_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
               axes_dims_rope=(2, 2, 4))
    m = FluxTransformer2DModel(**cfg)
    n, txt = 16, 6
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(n, 3)
    return m, dict(hidden_states=torch.randn(b, n, 8), encoder_hidden_states=torch.randn(b, txt, 12),
                   pooled_projections=torch.randn(b, 10), timestep=torch.full((b,), 0.5),
                   img_ids=img_ids, txt_ids=torch.zeros(txt, 3))


def _sana(size, b, L):
    from diffusers import SanaTransformer2DModel

    cfg = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
               num_layers=L or 2, num_cross_attention_heads=2, cross_attention_head_dim=8,
               cross_attention_dim=16, caption_channels=12, mlp_ratio=2.0, sample_size=8, patch_size=2)
    m = SanaTransformer2DModel(**cfg)
    return m, dict(hidden_states=torch.randn(b, 4, 8, 8), encoder_hidden_states=torch.randn(b, 5, 12),
                   timestep=torch.full((b,), 500, dtype=torch.long))


_BUILDERS: dict[str, Callable] = {"dit": _dit, "pixart": _pixart, "sd3": _sd3, "flux": _flux, "sana": _sana}


# pipelines --------------------------------------------------------------------------------------
# Real diffusers pipelines from tiny random parts, offline: no tokenizer or text encoder (the
# prompt embeddings are given), a tiny VAE (AutoencoderKL; Sana's own AutoencoderDC) with two
# levels, so pixels = 2 x latents.

#: pixel sizes each pipeline accepts: a multiple of VAE factor x patch size (x 2 for Flux's packing)
PIPELINE_SIZE_MULTIPLE = {"dit": 4, "pixart": 8, "sd3": 4, "flux": 4, "sana": 32}


def pipeline(family: str, seed: int = 0, num_layers: int | None = None, steps: int = 4, max_size: int = 64,
             heads: int | None = None, head_dim: int | None = None):
    """(pipeline, call kwargs): the family's diffusers pipeline built offline, with CFG on.

    ``family`` in FAMILIES: ``DiTPipeline`` (DDIM, ``id2label`` given), ``PixArtSigmaPipeline``
    (DPM-Solver++), ``StableDiffusion3Pipeline``, ``FluxPipeline`` (flow matching) and
    ``SanaPipeline`` (DPM-Solver++, flow prediction). The kwargs hold the prompt embeddings
    ([1, text tokens, caption dim], pooled [1, pooled dim] where the family needs them), their
    negatives (Flux: ``true_cfg_scale`` 4, so the transformer runs twice per step under
    diffusers' ``cache_context("cond"/"uncond")``; the others batch cond and uncond),
    ``num_inference_steps=steps`` and ``output_type="latent"`` (DiT: ``"pt"``, it always
    decodes). Call it with ``run_pipeline``.
    ``num_layers``: blocks per block list (Flux: double and single blocks; None: ``build``'s
    tiny defaults). ``max_size``: the largest pixel size the pipeline must serve (SD3's
    position table). ``heads`` / ``head_dim``: a wider transformer (benchmarks; the tiny one
    has 2 x 8), with the widths that must match it (SD3's caption projection, PixArt's and
    Sana's cross-attention, Flux's rotary axes) following.

    Raises:
        ValueError: unknown family; ``head_dim`` not a multiple of 8.
    """
    if family not in _PIPELINES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    torch.manual_seed(seed)
    pipe, kwargs = _PIPELINES[family](num_layers, max_size, _width(family, heads or 2, head_dim or 8))
    pipe.set_progress_bar_config(disable=True)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    # DiTPipeline always decodes: its images are [B, 3, H, W] tensors in [0, 1]
    return pipe, dict(kwargs, num_inference_steps=steps, output_type="pt" if family == "dit" else "latent")


def run_pipeline(pipe, kwargs: dict, size: int, seed: int = 0, **overrides):
    """``pipe(**kwargs, **overrides)`` at ``size`` x ``size`` pixels with a generator seeded
    ``seed``; returns the pipeline's images (latents [B, C, size/2, size/2] for
    ``output_type="latent"``, Flux's packed [B, (size/4)^2, 4 C]; DiT: [B, 3, size, size]).

    DiTPipeline has no height/width (it samples at ``transformer.config.sample_size``): its
    sample size is set to the latent size first, as a user would to sample another size.

    Raises:
        ValueError: ``size`` not a multiple of the family's ``PIPELINE_SIZE_MULTIPLE``.
    """
    family = _family_of(pipe)
    if size % PIPELINE_SIZE_MULTIPLE[family]:
        raise ValueError(f"size: {family} needs a multiple of {PIPELINE_SIZE_MULTIPLE[family]}, got {size}")
    args = dict(kwargs, generator=torch.Generator().manual_seed(seed), **overrides)
    if family == "dit":
        pipe.transformer.register_to_config(sample_size=size // 2)
    else:
        args.update(height=size, width=size)
    return pipe(**args).images


def _family_of(pipe) -> str:
    names = {"DiTPipeline": "dit", "PixArtSigmaPipeline": "pixart", "StableDiffusion3Pipeline": "sd3",
             "FluxPipeline": "flux", "SanaPipeline": "sana"}
    return names[type(pipe).__name__]


def _tiny(family: str, num_layers: int | None, **overrides):
    """The family's tiny transformer of ``build`` with config ``overrides``."""
    model, _ = build(family, num_layers=num_layers)
    return type(model).from_config({**model.config, **overrides})


def _width(family: str, heads: int, head_dim: int) -> dict:
    """Transformer config overrides for ``heads`` x ``head_dim`` attention (inner width h d)."""
    if head_dim % 8:
        raise ValueError(f"head_dim: expected a multiple of 8, got {head_dim}")
    inner = heads * head_dim
    out = {"num_attention_heads": heads, "attention_head_dim": head_dim}
    if family == "sd3":
        out["caption_projection_dim"] = inner
    elif family == "pixart":
        out["cross_attention_dim"] = inner
    elif family == "sana":
        out.update(cross_attention_dim=inner, num_cross_attention_heads=heads, cross_attention_head_dim=head_dim)
    elif family == "flux":  # rotary axes (frame, row, column) split the head dim in even parts
        a = 2 * (head_dim // 8)
        b = 2 * ((head_dim - a) // 4)
        out["axes_dims_rope"] = (a, b, head_dim - a - b)
    return out


def _vae_kl(latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=8, sample_size=32, **kw)


def _embeds(tokens: int, dim: int, pooled: int | None = None, mask: bool = False, negative: bool = True) -> dict:
    out = {"prompt_embeds": torch.randn(1, tokens, dim)}
    if pooled:
        out["pooled_prompt_embeds"] = torch.randn(1, pooled)
    if mask:
        out["prompt_attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
    if negative:
        out.update({"negative_" + k: (v if k.endswith("mask") else torch.randn_like(v)) for k, v in list(out.items())})
    return out


def _pipe_dit(L, max_size, width):
    from diffusers import DDIMScheduler, DiTPipeline

    # DiTPipeline's null class for CFG is label 1000: the label table needs 1000 classes
    tr = _tiny("dit", L, num_embeds_ada_norm=1000, **width)
    pipe = DiTPipeline(transformer=tr, vae=_vae_kl(), scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"})
    return pipe, dict(class_labels=[1], guidance_scale=4.0)


def _pipe_pixart(L, max_size, width):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae_kl(), transformer=_tiny("pixart", L, **width),
                               scheduler=DPMSolverMultistepScheduler())
    # resolution binning only knows the real models' sample sizes
    return pipe, dict(_embeds(5, 12, mask=True), negative_prompt=None, guidance_scale=4.5,
                      use_resolution_binning=False)


def _pipe_sd3(L, max_size, width):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # the position table must cover max_size pixels: max_size / 2 latents / patch 2
    tr = _tiny("sd3", L, pos_embed_max_size=max(8, max_size // 4), **width)
    pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae_kl(shift_factor=0.0), text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    return pipe, dict(_embeds(6, 12, pooled=10), guidance_scale=5.0)


def _pipe_flux(L, max_size, width):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    # 2x2 latent patches are packed into tokens: in_channels = 4 x the VAE's latent channels
    tr = _tiny("flux", L, in_channels=16, **({"num_single_layers": L} if L else {}), **width)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae_kl(shift_factor=0.0),
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
    return pipe, dict(_embeds(6, 12, pooled=10), true_cfg_scale=4.0)


def _pipe_sana(L, max_size, width):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline

    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        upsample_block_type="interpolate", downsample_block_type="conv")
    sched = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=_tiny("sana", L, **width), scheduler=sched)
    return pipe, dict(_embeds(5, 12, mask=True), negative_prompt=None, guidance_scale=4.5,
                      use_resolution_binning=False)


_PIPELINES: dict[str, Callable] = {"dit": _pipe_dit, "pixart": _pipe_pixart, "sd3": _pipe_sd3, "flux": _pipe_flux,
                                   "sana": _pipe_sana}
