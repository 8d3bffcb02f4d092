"""Tiny configs of the Wan 2.1 / 2.2 and Mochi transformers, from diffusers' tests
(tests/models/transformers/), registered into ``zoo_spec.SPECS``."""

import torch

from .zoo_spec import ClassSpec, randn, register, timesteps

register(
    ClassSpec(
        "WanTransformer3DModel", "video",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda b, g: dict(hidden_states=randn(g, b, 4, 2, 16, 16), encoder_hidden_states=randn(g, b, 12, 16),
                          timestep=timesteps(g, b))),
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
