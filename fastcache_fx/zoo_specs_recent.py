"""Tiny configs of the Lumina2, Flux-family (Chroma, Bria, Ovis-Image, LongCat-Image), Z-Image, PRX,
ERNIE-Image, Krea2 and HunyuanVideo (1, 1.5, FramePack) transformers, from diffusers' tests
(tests/models/transformers/), registered into ``zoo_spec.SPECS``."""

import torch

from .zoo_spec import ClassSpec, randn, register, timesteps



def _flux_like(b, g, *, c=4, hw=4, seq=48, dim=32, **extra):
    # Flux-style packed latents [B, H*W, C] with 2-D (unbatched) txt/img position ids, as in diffusers' tests.
    return dict(hidden_states=randn(g, b, hw * hw, c), encoder_hidden_states=randn(g, b, seq, dim),
                img_ids=randn(g, hw * hw, 3), txt_ids=randn(g, seq, 3), **extra)


def _krea2_inputs(b, g, grid=4, text_len=4, n_text_layers=3, text_dim=16, c=16):
    n_img = grid * grid
    position_ids = torch.zeros(text_len + n_img, 3)
    position_ids[text_len:, 1] = torch.arange(grid).repeat_interleave(grid).float()
    position_ids[text_len:, 2] = torch.arange(grid).repeat(grid).float()
    mask = torch.ones(b, text_len, dtype=torch.bool)
    mask[:, -1] = False  # one padded text token (the key-padding mask path), as diffusers' test does
    return dict(hidden_states=randn(g, b, n_img, c), encoder_hidden_states=randn(g, b, text_len, n_text_layers, text_dim),
                timestep=timesteps(g, b, 1.0), position_ids=position_ids, encoder_attention_mask=mask)


def _framepack_inputs(b, g, c=4, f=2, hw=4):
    # FramePack context: f noisy frames, 1 clean frame, 1 frame of 2x history, 4 frames of 4x history;
    # frame indices laid out as the pipeline does (history first, then the clean prefix, then the latents).
    return dict(hidden_states=randn(g, b, c, f, hw, hw), timestep=timesteps(g, b), encoder_hidden_states=randn(g, b, 12, 16),
                pooled_projections=randn(g, b, 8), encoder_attention_mask=torch.ones(b, 12),
                guidance=torch.full((b,), 6000.0), image_embeds=randn(g, b, 12, 16),
                indices_latents=torch.arange(6, 6 + f).float(),
                latents_clean=randn(g, b, c, 1, hw, hw), indices_latents_clean=torch.tensor([5.0]),
                latents_history_2x=randn(g, b, c, 1, hw, hw), indices_latents_history_2x=torch.tensor([4.0]),
                latents_history_4x=randn(g, b, c, 4, hw, hw), indices_latents_history_4x=torch.arange(4).float())


register(
    ClassSpec(
        "Lumina2Transformer2DModel", "image",
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
             scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=32),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 16, 16), encoder_hidden_states=randn(g, b, 16, 32),
                          timestep=timesteps(g, b, 1.0), encoder_attention_mask=torch.ones(b, 16, dtype=torch.bool)),
        t_max=1.0, rising=True),
    ClassSpec(
        "ChromaTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
             approximator_hidden_dim=16, approximator_layers=1),
        lambda b, g: _flux_like(b, g, timestep=timesteps(g, b, 1.0)),
        t_max=1.0),
    ClassSpec(
        "ZImageTransformer2DModel", "image",
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=1,
             n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
             axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        lambda b, g: dict(x=randn(g, b, 16, 1, 16, 16), cap_feats=randn(g, b, 16, 16), t=timesteps(g, b, 1.0),
                          return_dict=False),
        timestep="t", latent="x", t_max=1.0, rising=True,
        note="x / cap_feats given as batched tensors (the forward iterates them per sample like its lists); "
             "return_dict=False: the output is a list of per-sample tensors, the check compares the first"),
    ClassSpec(
        "BriaTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
        lambda b, g: _flux_like(b, g, timestep=timesteps(g, b))),
    ClassSpec(
        "OvisImageTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda b, g: _flux_like(b, g, timestep=timesteps(g, b, 1.0)),
        t_max=1.0),
    ClassSpec(
        "LongCatImageTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda b, g: _flux_like(b, g, timestep=timesteps(g, b, 1.0), guidance=torch.full((b,), 3.5)),
        t_max=1.0),
    ClassSpec(
        "PRXTransformer2DModel", "image",
        dict(in_channels=16, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=3.5, num_heads=2, depth=2,
             axes_dim=[8, 8], theta=10_000),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 16, 16), encoder_hidden_states=randn(g, b, 16, 32),
                          timestep=timesteps(g, b, 1.0)),
        t_max=1.0, note="tiny widths, 2 blocks (diffusers' test: hidden 1792, 28 heads, depth 4)"),
    ClassSpec(
        "ErnieImageTransformer2DModel", "image",
        dict(hidden_size=16, num_attention_heads=1, num_layers=2, ffn_hidden_size=16, in_channels=16,
             out_channels=16, patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), eps=1e-6,
             qk_layernorm=True),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 8, 8), timestep=timesteps(g, b), text_bth=randn(g, b, 16, 16),
                          text_lens=torch.full((b,), 16, dtype=torch.long)),
        note="2 layers (diffusers' test: 1)"),
    ClassSpec(
        "Krea2Transformer2DModel", "image",
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
             text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0,
             norm_eps=1e-5),
        _krea2_inputs,
        t_max=1.0),
    ClassSpec(
        "HunyuanVideo15Transformer3DModel", "video",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 1, 8, 8), timestep=timesteps(g, b),
                          encoder_hidden_states=randn(g, b, 6, 16), encoder_hidden_states_2=randn(g, b, 4, 8),
                          encoder_attention_mask=torch.ones(b, 6), encoder_attention_mask_2=torch.ones(b, 4),
                          image_embeds=torch.zeros(b, 3, 12))),
    ClassSpec(
        "HunyuanVideoTransformer3DModel", "video",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 1, 8, 8), timestep=timesteps(g, b), encoder_hidden_states=randn(g, b, 12, 16),
                          pooled_projections=randn(g, b, 8), encoder_attention_mask=torch.ones(b, 12),
                          guidance=torch.full((b,), 6000.0))),
    ClassSpec(
        "HunyuanVideoFramepackTransformer3DModel", "video",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=None,
             has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True),
        _framepack_inputs),
)
