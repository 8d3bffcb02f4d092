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
