"""Every diffusers DiT class from a tiny config, for the conformance test and its README table.

Each ``ClassSpec`` holds the tiny config and the forward inputs of one transformer class, taken
from diffusers' own test suite (tests/models/transformers/ in the diffusers repository, 0.42.1)
and shrunk where a class allowed it (fewer layers, smaller images), plus the name of the timestep
input and its range. Nothing is downloaded: weights are random (seeded), text inputs are given
as embeddings.

``build(name)`` returns the model in eval mode with gradients off and a function of
(batch, generator) that makes its forward kwargs; ``trajectory`` scripts the inputs of a
denoising trajectory (decreasing timestep, slowly moving latents) for the cache to act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class ClassSpec:
    """One diffusers transformer class with a tiny config.

    Attributes:
        cls: the class name exported by ``diffusers``.
        kind: "image" or "video" (a DiT denoiser), or "refused" (a class that is not a DiT
            denoiser; the backend must say so in ``stats()["fallback"]``).
        init: the constructor kwargs (a tiny config).
        inputs: (batch B, torch.Generator) -> forward kwargs, the timestep included.
        timestep: the name of the timestep input (a [B] tensor).
        t_max: the timestep at the start of a trajectory (1000 for models fed train timesteps,
            1.0 for those fed sigmas / flow times).
        latent: the name of the noisy-latent input.
        note: why the config differs from diffusers' test config, or what the class needs.
        dynamo: ``torch._dynamo.config`` settings a direct ``torch.compile`` needs
            (``enable_fastcache`` sets them itself).
        enable: the class needs ``enable_fastcache`` (it prepares the model before compiling).
    """

    cls: str
    kind: str
    init: dict
    inputs: Callable[[int, torch.Generator], dict]
    timestep: str = "timestep"
    t_max: float = 1000.0
    latent: str = "hidden_states"
    note: str = ""
    dynamo: dict = field(default_factory=dict)
    enable: bool = False


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _t(g: torch.Generator, b: int, t_max: float = 1000.0) -> torch.Tensor:
    return torch.rand(b, generator=g) * t_max


SPECS: dict[str, ClassSpec] = {}


def _add(*specs: ClassSpec) -> None:
    for s in specs:
        SPECS[s.cls] = s


_add(
    ClassSpec(
        "WanTransformer3DModel", "video",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda b, g: dict(hidden_states=_r(g, b, 4, 2, 16, 16), encoder_hidden_states=_r(g, b, 12, 16),
                          timestep=_t(g, b))),
    ClassSpec(
        "MochiTransformer3DModel", "video",
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        lambda b, g: dict(hidden_states=_r(g, b, 4, 2, 16, 16), encoder_hidden_states=_r(g, b, 16, 16),
                          timestep=_t(g, b), encoder_attention_mask=torch.ones(b, 16, dtype=torch.bool)),
        note="its text mask selects tokens by value (a data-dependent shape): needs "
             "torch._dynamo.config.capture_dynamic_output_shape_ops",
        dynamo={"capture_dynamic_output_shape_ops": True}),
    ClassSpec(
        "HiDreamImageTransformer2DModel", "image",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
             num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
             force_inference_output=True),
        lambda b, g: dict(hidden_states=_r(g, b, 4, 32, 32), encoder_hidden_states_t5=_r(g, b, 8, 8),
                          encoder_hidden_states_llama3=_r(g, 2, b, 8, 4), pooled_embeds=_r(g, b, 8),
                          timesteps=_t(g, b)),
        timestep="timesteps", enable=True,
        note="its MoE layers route on host values: enable_fastcache makes each one opaque op (runtime.opaque)"),
    ClassSpec(
        "OmniGenTransformer2DModel", "image",
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
             pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": list(range(1, 3)), "short_factor": list(range(1, 3))}),
        lambda b, g: dict(hidden_states=_r(g, b, 4, 8, 8), timestep=_t(g, b, 1.0),
                          input_ids=torch.randint(0, 10, (b, 24), generator=g), input_img_latents=[_r(g, 1, 4, 8, 8)],
                          input_image_sizes={0: [[0, 16]]}, attention_mask=torch.ones(b, 41, 41),
                          position_ids=torch.arange(41).repeat(b, 1)),
        t_max=1.0, note="2 layers (diffusers' test: 20)"),
    ClassSpec(
        "GlmImageTransformer2DModel", "image",
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda b, g: dict(hidden_states=_r(g, b, 4, 8, 8), encoder_hidden_states=_r(g, b, 12, 32),
                          prior_token_id=torch.randint(0, 64, (b,), generator=g),
                          prior_token_drop=torch.zeros(b, dtype=torch.bool), timestep=_t(g, b),
                          target_size=torch.tensor([[8.0, 8.0]] * b), crop_coords=torch.zeros(b, 2))),
)


def build(name: str, seed: int = 0):
    """(model, inputs): ``name``'s diffusers class built from its tiny config with weights seeded
    ``seed``, in eval mode with gradients off, and ``inputs(batch, generator)`` its forward kwargs.

    Raises:
        ValueError: ``name`` not in ``SPECS``.
    """
    import diffusers

    if name not in SPECS:
        raise ValueError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    spec = SPECS[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, spec.cls)(**spec.init).eval().requires_grad_(False)
    return model, spec.inputs


def trajectory(name: str, steps: int, batch: int = 1, seed: int = 0) -> list[dict]:
    """The forward kwargs of ``steps`` denoising steps of ``name``'s model at ``batch``: the
    timestep falls linearly from ``t_max`` to ``t_max / steps`` and the latent moves by 5 % of a
    fixed noise per step (tiny random models: their block inputs change far more per step than a
    trained model's, so the approximation is forced with a large threshold, not earned).

    Raises:
        ValueError: ``name`` not in ``SPECS``; ``steps`` < 1.
    """
    if name not in SPECS:
        raise ValueError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    spec = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    base = spec.inputs(batch, g)
    drift = _r(g, *base[spec.latent].shape)
    out = []
    for k in range(steps):
        kw = dict(base)
        t = base[spec.timestep]
        kw[spec.timestep] = torch.full_like(t, spec.t_max * (steps - k) / steps)
        kw[spec.latent] = base[spec.latent] + 0.05 * k * drift
        out.append(kw)
    return out


def output_tensor(out) -> torch.Tensor:
    """The sample tensor of a diffusers transformer's output (a ``Transformer2DModelOutput``, a
    tuple whose first item is the sample, or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    return out.sample


def check(name: str, steps: int = 5, batch: int = 1, seed: int = 0) -> dict:
    """The conformance check of one class (README "Supported models"): ``name``'s model on a
    scripted ``trajectory`` of ``steps`` calls, eager and with ``backend="fastcache"``
    (``torch.compile``'s default arguments, ``cache_ratio_threshold=10``; ``enable_fastcache``
    for a spec with ``enable``), once with every block
    forced full (``replay_decisions``: approximation off, one compiled graph for both runs) and
    once live.

    Returns:
        dict with ``cls``, ``kind``; ``block_lists`` (the ModuleList names the blocks come from),
        ``blocks`` (count), ``streams`` (residual streams per block: sorted distinct counts),
        ``graphs`` {kind: count} (Dynamo's graphs: "fastcache", "glue" (no blocks, split off at a
        graph break), "fallback"...), ``fallback`` (reasons), ``off_rel_err`` (max over steps of
        ||compiled - eager|| / ||eager|| with every block computed), ``approx_ratio`` (approximated
        block-steps of the live run), ``live_rel_err`` (max over steps, live run vs eager),
        ``finite`` (every live output finite).

    Raises:
        ValueError: ``name`` not in ``SPECS``.
    """
    import fastcache_fx

    spec = SPECS[name]
    model, _ = build(name, seed)
    traj = trajectory(name, steps, batch, seed)
    with torch._dynamo.config.patch(**spec.dynamo):
        refs = [output_tensor(model(**kw)) for kw in traj]
        if spec.enable:
            compiled = fastcache_fx.enable_fastcache(model, cache_ratio_threshold=10.0)
        else:
            compiled = torch.compile(model, backend="fastcache", options={"cache_ratio_threshold": 10.0})
        fastcache_fx.reset(compiled)
        with fastcache_fx.replay_decisions(compiled, [[False]], then="full"):
            off = [output_tensor(compiled(**kw)) for kw in traj]
        fastcache_fx.reset(compiled)
        on = [output_tensor(compiled(**kw)) for kw in traj]
    st = fastcache_fx.stats(compiled)
    graphs: dict[str, int] = {}
    for g in st["per_graph"]:
        graphs[g["kind"]] = graphs.get(g["kind"], 0) + 1
    lists = []
    for b in st["blocks"]:
        head = b.rsplit(".", 1)[0] if b.rsplit(".", 1)[-1].isdigit() else b
        if head not in lists:
            lists.append(head)
    return {"cls": spec.cls, "kind": spec.kind, "block_lists": lists, "blocks": len(st["blocks"]),
            "streams": sorted({n for g in st["per_graph"] for n in g.get("streams", [])}),
            "graphs": graphs, "fallback": st["fallback"],
            "off_rel_err": max(_rel(a, b) for a, b in zip(off, refs)),
            "approx_ratio": st["block_approx_ratio"],
            "live_rel_err": max(_rel(a, b) for a, b in zip(on, refs)),
            "finite": all(bool(torch.isfinite(o).all()) for o in on)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
