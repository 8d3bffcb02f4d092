"""Tiny configs of the DiT, PixArt, SD3, Flux, Flux.2, Sana, AuraFlow, Qwen-Image, Hunyuan-DiT and
CogView3-Plus / CogView4, HiDream-I1, OmniGen and GLM-Image transformers, from diffusers' tests (tests/models/transformers/), registered
into ``zoo_spec.SPECS``."""

import torch

from .zoo_spec import ClassSpec, randn, register, timesteps


def _flux2_inputs(b, g, hw=4, seq=48, c=4, dim=32):
    # Flux.2 position ids (t, h, w, l), batched as in diffusers' test (the model reads the first row).
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(hw), torch.arange(hw), torch.arange(1))
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq))
    return dict(hidden_states=randn(g, b, hw * hw, c), encoder_hidden_states=randn(g, b, seq, dim),
                img_ids=img_ids.unsqueeze(0).expand(b, -1, -1), txt_ids=txt_ids.unsqueeze(0).expand(b, -1, -1),
                timestep=timesteps(g, b, 1.0), guidance=torch.ones(b))


def _hunyuan_dit_inputs(b, g, hw=8, patch=2, head_dim=8, seq=4, dim=8):
    # The 2-D rotary embedding of the token grid, made as HunyuanDiTPipeline makes it.
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    grid = hw // patch
    base = 512 // 8 // patch
    crop = ((0, 0), (base, base))  # square grid: get_resize_crop_region_for_grid((grid, grid), base)
    rope = get_2d_rotary_pos_embed(head_dim, crop, (grid, grid), output_type="pt")
    return dict(hidden_states=randn(g, b, 4, hw, hw), encoder_hidden_states=randn(g, b, seq, dim),
                text_embedding_mask=torch.ones(b, seq), encoder_hidden_states_t5=randn(g, b, seq, dim),
                text_embedding_mask_t5=torch.ones(b, seq), timestep=timesteps(g, b),
                image_meta_size=torch.tensor([[1024.0, 1024.0, 16.0, 16.0, 0.0, 0.0]] * b),
                style=torch.zeros(b, dtype=torch.long), image_rotary_emb=rope)


def _cogview_inputs(b, g, hw=8, seq=8, dim=8):
    size = torch.tensor([[hw * 8, hw * 8]] * b)
    return dict(hidden_states=randn(g, b, 4, hw, hw), encoder_hidden_states=randn(g, b, seq, dim), timestep=timesteps(g, b),
                original_size=size, target_size=size.clone(), crop_coords=torch.zeros(b, 2, dtype=torch.long))


register(
    ClassSpec(
        "DiTTransformer2DModel", "image",
        dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2,
             attention_head_dim=4, attention_bias=True, num_layers=2, norm_type="ada_norm_zero",
             num_embeds_ada_norm=8, patch_size=2, sample_size=8),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), timestep=timesteps(g, b),
                          class_labels=torch.randint(0, 4, (b,), generator=g)),
        note="2 layers (diffusers' test: 1)"),
    ClassSpec(
        "PixArtTransformer2DModel", "image",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=2, num_attention_heads=2, in_channels=4,
             cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
             num_embeds_ada_norm=8, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
             use_additional_conditions=False, caption_channels=None),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), timestep=timesteps(g, b), encoder_hidden_states=randn(g, b, 8, 8),
                          added_cond_kwargs={"aspect_ratio": None, "resolution": None}),
        note="2 layers (diffusers' test: 1)"),
    ClassSpec(
        "SD3Transformer2DModel", "image",
        dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
             caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
             pos_embed_max_size=96, dual_attention_layers=(), qk_norm=None),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), encoder_hidden_states=randn(g, b, 16, 32),
                          pooled_projections=randn(g, b, 64), timestep=timesteps(g, b)),
        note="2 layers, 8x8 latent, 16 text tokens (diffusers' test: 4 layers, 32x32, 154 tokens)"),
    ClassSpec(
        "FluxTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 4), encoder_hidden_states=randn(g, b, 48, 32),
                          pooled_projections=randn(g, b, 32), img_ids=randn(g, 16, 3), txt_ids=randn(g, 48, 3),
                          timestep=timesteps(g, b, 1.0)),
        t_max=1.0),
    ClassSpec(
        "Flux2Transformer2DModel", "image",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
             axes_dims_rope=[4, 4, 4, 4]),
        _flux2_inputs, t_max=1.0),
    ClassSpec(
        "SanaTransformer2DModel", "image",
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
             num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
             sample_size=8),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), encoder_hidden_states=randn(g, b, 8, 8), timestep=timesteps(g, b)),
        note="2 layers, 8x8 latent (diffusers' test: 1 layer, 32x32)"),
    ClassSpec(
        "AuraFlowTransformer2DModel", "image",
        dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
             out_channels=4, pos_embed_max_size=256),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 16, 16), encoder_hidden_states=randn(g, b, 16, 32),
                          timestep=timesteps(g, b, 1.0)),
        t_max=1.0, note="16x16 latent, 16 text tokens (diffusers' test: 32x32, 256 tokens)"),
    ClassSpec(
        "QwenImageTransformer2DModel", "image",
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 16), encoder_hidden_states=randn(g, b, 8, 16),
                          encoder_hidden_states_mask=torch.ones(b, 8, dtype=torch.long), timestep=timesteps(g, b, 1.0),
                          img_shapes=[(1, 4, 4)] * b),
        t_max=1.0),
    ClassSpec(
        "HunyuanDiT2DModel", "image",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
             text_len_t5=4, activation_fn="gelu-approximate"),
        _hunyuan_dit_inputs,
        note="2 layers (diffusers' test: 1); image_rotary_emb is the pipeline's 2-D RoPE of the 4x4 grid "
             "(diffusers' test: a [1, 8] placeholder)"),
    ClassSpec(
        "CogView3PlusTransformer2DModel", "image",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8),
        _cogview_inputs),
    ClassSpec(
        "CogView4Transformer2DModel", "image",
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
             text_embed_dim=8, time_embed_dim=8, condition_dim=4),
        _cogview_inputs),
)

register(
    ClassSpec(
        "HiDreamImageTransformer2DModel", "image",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
             force_inference_output=True),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 32, 32), encoder_hidden_states_t5=randn(g, b, 8, 8),
                          encoder_hidden_states_llama3=randn(g, 2, b, 8, 4), pooled_embeds=randn(g, b, 8),
                          timesteps=timesteps(g, b)),
        timestep="timesteps", enable=True,
        note="its MoE layers route on host values: enable_fastcache makes each one opaque op (runtime.opaque)"),
    ClassSpec(
        "OmniGenTransformer2DModel", "image",
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
             pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))}),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), timestep=timesteps(g, b, 1.0),
                          input_ids=torch.randint(0, 10, (b, 24), generator=g), input_img_latents=[randn(g, 1, 4, 8, 8)],
                          input_image_sizes={0: [[0, 16]]}, attention_mask=torch.ones(b, 41, 41),
                          position_ids=torch.arange(41).repeat(b, 1)),
        t_max=1.0, note="2 layers (diffusers' test: 20)"),
    ClassSpec(
        "GlmImageTransformer2DModel", "image",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 8, 8), encoder_hidden_states=randn(g, b, 12, 32),
                          prior_token_id=torch.randint(0, 64, (b,), generator=g),
                          prior_token_drop=torch.zeros(b, dtype=torch.bool), timestep=timesteps(g, b),
                          target_size=torch.tensor([[8.0, 8.0]] * b), crop_coords=torch.zeros(b, 2))),
)
