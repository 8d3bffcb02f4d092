"""Tiny configs of the Wan 2.1 / 2.2, Mochi, Sana-Video, Wan-VACE, SkyReels-V2, ChronoEdit, LTX-Video, LTX-2, CogVideoX,
Allegro, Cosmos, EasyAnimate, Latte and Kandinsky 5 video transformers, from diffusers' tests
(tests/models/transformers/; Kandinsky 5: tests/pipelines/kandinsky5/), registered into
``zoo_spec.SPECS``."""

import torch

from .zoo_spec import ClassSpec, randn, register, timesteps


def _ltx_inputs(b, g, f=2, hw=8, c=4, seq=16, dim=16):
    # LTX-Video takes patchified tokens [B, F*H*W, C] and the latent grid size.
    return dict(hidden_states=randn(g, b, f * hw * hw, c), encoder_hidden_states=randn(g, b, seq, dim), timestep=timesteps(g, b),
                encoder_attention_mask=torch.ones(b, seq, dtype=torch.bool), num_frames=f, height=hw, width=hw)


def _ltx2_inputs(b, g, f=2, hw=8, c=4, audio_f=9, audio_c=4, seq=16, dim=16):
    # LTX-2: a video and an audio token stream, each with its text embeddings.
    return dict(hidden_states=randn(g, b, f * hw * hw, c), audio_hidden_states=randn(g, b, audio_f, audio_c),
                encoder_hidden_states=randn(g, b, seq, dim), audio_encoder_hidden_states=randn(g, b, seq, dim),
                timestep=timesteps(g, b), encoder_attention_mask=torch.ones(b, seq, dtype=torch.bool),
                num_frames=f, height=hw, width=hw, audio_num_frames=audio_f, fps=25.0)


def _cosmos_inputs(b, g, f=1, hw=16, c=4, seq=12, dim=16):
    return dict(hidden_states=randn(g, b, c, f, hw, hw), timestep=timesteps(g, b, 1.0), encoder_hidden_states=randn(g, b, seq, dim),
                attention_mask=torch.ones(b, seq), fps=30)


def _kandinsky5_inputs(b, g, f=2, hw=8, c=16, seq=8, dim=32, dim2=16):
    # Kandinsky 5 takes channels-last latents [B, T, H, W, C] and the rotary positions of the
    # (patchified) grid and of the text tokens, as Kandinsky5T2VPipeline makes them.
    return dict(hidden_states=randn(g, b, f, hw, hw, c), encoder_hidden_states=randn(g, b, seq, dim),
                pooled_projections=randn(g, b, dim2), timestep=timesteps(g, b),
                visual_rope_pos=[torch.arange(f), torch.arange(hw // 2), torch.arange(hw // 2)],
                text_rope_pos=torch.arange(seq))


# Wan 2.1's tiny config and inputs (diffusers' test); SkyReels-V2 has the same constructor
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_inputs(b, g):
    return dict(hidden_states=randn(g, b, 4, 2, 16, 16), encoder_hidden_states=randn(g, b, 12, 16),
                timestep=timesteps(g, b))


register(
    ClassSpec(
        "SanaVideoTransformer3DModel", "video",
        dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
             mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
             norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 2, 16, 16), encoder_hidden_states=randn(g, b, 12, 16),
                          timestep=timesteps(g, b))),
    ClassSpec(
        "WanVACETransformer3DModel", "video",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
             text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0], vace_in_channels=48),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 2, 16, 16), encoder_hidden_states=randn(g, b, 12, 32),
                          control_hidden_states=randn(g, b, 48, 2, 16, 16), timestep=timesteps(g, b)),
        note="1 block and 1 VACE block (diffusers' test: 4 blocks, VACE at 0 and 2)"),
    ClassSpec(
        "SkyReelsV2Transformer3DModel", "video",
        _WAN, _wan_inputs),
    ClassSpec(
        "ChronoEditTransformer3DModel", "video",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
             text_dim=32, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
             rope_max_seq_len=64, pos_embed_seq_len=None, rope_temporal_skip_len=8),
        lambda b, g: dict(hidden_states=randn(g, b, 16, 2, 8, 8), timestep=timesteps(g, b),
                          encoder_hidden_states=randn(g, b, 12, 32))),
    ClassSpec(
        "LTXVideoTransformer3DModel", "video",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
        _ltx_inputs,
        note="2 layers, 8x8 latent (diffusers' test: 1 layer, 16x16)"),
    ClassSpec(
        "LTX2VideoTransformer3DModel", "video",
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
             audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
             caption_channels=16, rope_double_precision=False),
        _ltx2_inputs,
        note="8x8 latent (diffusers' test: 16x16)"),
    ClassSpec(
        "CogVideoXTransformer3DModel", "video",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             patch_size_t=None, temporal_compression_ratio=4, max_text_seq_length=8),
        lambda b, g: dict(hidden_states=randn(g, b, 1, 4, 8, 8), encoder_hidden_states=randn(g, b, 8, 8),
                          timestep=timesteps(g, b))),
    ClassSpec(
        "AllegroTransformer3DModel", "video",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
             cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 2, 8, 8), encoder_hidden_states=randn(g, b, 16, 8),
                          timestep=timesteps(g, b)),
        note="2 layers (diffusers' test: 1)"),
    ClassSpec(
        "CosmosTransformer3DModel", "video",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
             text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False, extra_pos_embed_type="learnable"),
        _cosmos_inputs, t_max=1.0,
        note="concat_padding_mask=False (diffusers' test: True; it resizes the mask with torchvision, not "
             "installed, and its pipelines pass a [1, 1, H, W] mask that the model repeats by the batch); "
             "timestep in [0, 1]: Cosmos 2 pipelines pass sigma / (sigma + 1), Cosmos 1 the EDM c_noise"),
    ClassSpec(
        "EasyAnimateTransformer3DModel", "video",
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 2, 16, 16), timestep=timesteps(g, b),
                          encoder_hidden_states=randn(g, b, 16, 16))),
    ClassSpec(
        "LatteTransformer3DModel", "video",
        dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, video_length=2),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 2, 8, 8), encoder_hidden_states=randn(g, b, 8, 8),
                          timestep=timesteps(g, b), enable_temporal_attentions=True),
        note="2 frames, video_length=2 (diffusers' test: 1 frame, where temporal attention sees one token); "
             "1 spatial + 1 temporal block"),
    ClassSpec(
        "Kandinsky5Transformer3DModel", "video",
        dict(in_visual_dim=16, in_text_dim=32, in_text_dim2=16, time_dim=16, out_visual_dim=16, patch_size=(1, 2, 2),
             model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=1, axes_dims=(1, 1, 2),
             visual_cond=False, attention_type="regular"),
        _kandinsky5_inputs,
        note="config of diffusers' pipeline test (no model test) with 1 visual block (test: 2), 8x8 latent; its "
             "rotary rounds q, k to bfloat16, which Inductor skips unless emulate_precision_casts (without it "
             "compiled vs eager is ~2e-4, plain torch.compile too)",
        inductor={"emulate_precision_casts": True}),
)

register(
    ClassSpec(
        "WanTransformer3DModel", "video",
        _WAN, _wan_inputs),
    ClassSpec(
        "MochiTransformer3DModel", "video",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 2, 16, 16), encoder_hidden_states=randn(g, b, 16, 16),
                          timestep=timesteps(g, b), encoder_attention_mask=torch.ones(b, 16, dtype=torch.bool)),
        note="its text mask selects tokens by value (a data-dependent shape): needs "
             "torch._dynamo.config.capture_dynamic_output_shape_ops",
        dynamo={"capture_dynamic_output_shape_ops": True}),
)
