"""The real-size cost section of benchmarks/gpu_check.py: FLUX.1-dev blocks.

A ``FluxTransformer2DModel`` with FLUX.1-dev's widths (24 heads x 128 = 3072, text width 4096,
pooled 768, guidance embedding, rotary axes 16/56/56) and random weights in bf16, but only a few
blocks (``double`` joint blocks and ``single`` single-stream blocks, default 2 + 4), on 4096 image
tokens (a 64 x 64 latent grid, 1024 px) and 512 text tokens, batch 1. Every variant runs the
same synthetic trajectory (timestep 1 -> 1/steps, hidden states drifting a little each step),
decisions forced all-full or all-approximated (``fastcache_fx.replay_decisions``: random weights
make live decisions meaningless), timed by CUDA events (``gpu_check_rows.time_steps``).

Extrapolation to FLUX.1-dev's 19 + 38 blocks (1 joint : 2 single, so ``single`` must be
``2 * double``): the glue (embeddings, norm_out, proj_out, rotary tables) is measured alone by a
plain-Inductor compile of the same model with no blocks; a row whose work grows with the block
count (everything fully computed, and the block level's approximated steps, whose decisions,
anchors and residual adds are per block) extrapolates as glue + (step - glue) * 19 / double; a
row whose approximated step computes a fixed front (the step level's ``front_blocks`` = 1,
FirstBlockCache's first block) keeps its measured time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import torch

from gpu_check_rows import Rows, count_host_syncs, peak_memory_gb, reset_peak, time_steps

#: FLUX.1-dev's block counts (transformer_blocks, single_transformer_blocks)
FLUX_DEV_BLOCKS = (19, 38)


def flux_config(double: int, single: int, smoke: bool) -> dict:
    """FluxTransformer2DModel kwargs: FLUX.1-dev's widths, or a tiny model for ``--smoke``."""
    if smoke:
        return dict(patch_size=1, in_channels=8, num_layers=double, num_single_layers=single, attention_head_dim=8,
                    num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
                    axes_dims_rope=(2, 2, 4))
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def flux_inputs(cfg: dict, smoke: bool, steps: int, device, dtype) -> list[dict]:
    """``steps`` kwargs of one synthetic trajectory: 64 x 64 image tokens + 512 text tokens (4 x 4 +
    6 for ``--smoke``), timestep 1 -> 1/steps, hidden states drifting by 1 % of one noise per step."""
    side, txt = (4, 6) if smoke else (64, 512)
    g = torch.Generator(device="cpu").manual_seed(0)
    n = side * side
    x = torch.randn(1, n, cfg["in_channels"], generator=g)
    noise = torch.randn(x.shape, generator=g)
    enc = torch.randn(1, txt, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                         indexing="ij"), -1).reshape(n, 3)
    base = dict(encoder_hidden_states=enc.to(device, dtype), pooled_projections=pooled.to(device, dtype),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(txt, 3, device=device),
                guidance=torch.full((1,), 3.5, device=device, dtype=dtype), return_dict=False)
    return [dict(base, hidden_states=(x + 0.01 * i * noise).to(device, dtype),
                 timestep=torch.full((1,), 1.0 - i / steps, device=device, dtype=dtype)) for i in range(steps)]


def build_flux(cfg: dict, device, dtype) -> torch.nn.Module:
    """The model with random weights (seed 0), built on ``device`` (no multi-GB CPU init)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**cfg)
    return model.to(dtype).eval().requires_grad_(False)


def cudagraph_options() -> dict | None:
    """The fastcache options selecting the CUDA-graph-friendly step lowering (issue 39 part 2), or
    None while this checkout has none: a ``cudagraphs`` config field, else a ``lowering`` name
    (``"inductor_split"``: the step cut at its decisions, pieces captured as CUDA graphs)."""
    from fastcache_fx import FastCacheConfig

    names = {f.name for f in dataclasses.fields(FastCacheConfig)}
    if "cudagraphs" in names:
        return {"cudagraphs": True, "cache_level": "step"}
    for lowering in ("inductor_split", "cudagraphs"):  # the name of issue 39 part 2 first
        try:
            FastCacheConfig(lowering=lowering, cache_level="step")
            return {"lowering": lowering, "cache_level": "step"}
        except ValueError:
            continue
    return None


def run_flux(rows: Rows, args, device: torch.device) -> None:
    """All rows of the section; each variant is skipped with one row when the deadline is near."""
    import fastcache_fx

    dtype = torch.float32 if args.smoke else torch.bfloat16
    d, s = args.flux_double, args.flux_single
    cfg = flux_config(d, s, args.smoke)
    steps = flux_inputs(cfg, args.smoke, args.steps, device, dtype)
    scale = FLUX_DEV_BLOCKS[0] / d if s == 2 * d else None
    common = dict(model="flux", double=d, single=s, dtype=str(dtype).split(".")[-1],
                  tokens=[steps[0]["hidden_states"].shape[1], steps[0]["encoder_hidden_states"].shape[1]],
                  steps=args.steps, repeats=args.repeats)
    need = args.compile_estimate_s
    glue = {}
    results = {}

    def call_of(fn):
        return lambda kw: fn(**kw)

    def emit(variant, fn, build_s, before=lambda: None, scales=True, extra=None, module=None):
        if module is not None:
            fastcache_fx.reset(module)  # the row's statistics: its own trajectories only
        reset_peak(device)
        t = time_steps(call_of(fn), steps, device, args.repeats, before)
        if module is not None:
            row_stats = fastcache_fx.stats(module)
            extra = dict(extra or {}, block_approx_ratio=round(row_stats["block_approx_ratio"], 3),
                         state_bytes=row_stats["state_bytes"])
        row = dict(common, variant=variant, build_s=round(build_s, 1), **t)
        row["host_syncs_per_step"] = count_host_syncs(call_of(fn), steps, device, before)
        row["peak_mem_gb"] = peak_memory_gb(device)
        out = fn(**steps[-1])
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        row["finite"] = bool(torch.isfinite(out).all())
        if "inductor" in results:
            row["vs_inductor"] = round(t["step_ms"] / results["inductor"], 3)
        if scale is not None and "ms" in glue:
            g = glue["ms"]
            row["extrapolated_57_blocks_ms"] = round(g + (t["step_ms"] - g) * scale, 2) if scales else t["step_ms"]
            row["extrapolation"] = "glue + (step - glue) * 19 / double" if scales else "fixed front: measured"
        row.update(extra or {})
        results[variant] = t["step_ms"]
        rows.write(**row)

    def compiled(model, **kw):
        torch.compiler.reset()
        c = torch.compile(model, dynamic=False, **kw)
        t0 = time.perf_counter()
        with torch.no_grad():
            c(**steps[0])
        return c, time.perf_counter() - t0

    # the glue alone: the same model with no blocks, plain Inductor
    if rows.has_time(need * 0.5, "glue"):
        m0 = build_flux(dict(cfg, num_layers=0, num_single_layers=0), device, dtype)
        c, b = compiled(m0)
        t = time_steps(call_of(c), steps, device, args.repeats)
        glue["ms"] = t["step_ms"]
        rows.write(**common, variant="glue (no blocks, inductor)", build_s=round(b, 1), **t)
        del m0, c

    model = build_flux(cfg, device, dtype)
    rows.write(**common, variant="model", params=sum(p.numel() for p in model.parameters()),
               weight_gb=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 3))
    if rows.has_time(need, "inductor"):
        c, b = compiled(model)
        emit("inductor", c, b)
        del c

    def fastcache_rows(label, options, approx_scales):
        if not rows.has_time(need * 1.5, label):
            return
        c, b = compiled(model, backend=fastcache_fx.FastCacheBackend(**options))
        last = fastcache_fx.stats(model)["per_graph"][-1]  # this compile's graph (earlier ones stay registered)
        info = {"options": options, "graph_kind": last.get("kind"), "fallback": last.get("fallback"),
                "conds_per_step": last.get("conds_per_step"), "cache_level": last.get("cache_level")}
        n = len(steps)
        emit(f"{label} all-full", c, b, module=model, extra=info,
             before=lambda: fastcache_fx.replay_decisions(model, [[False]] * n, then="full"))
        emit(f"{label} all-approx", c, b, module=model, scales=approx_scales,
             before=lambda: fastcache_fx.replay_decisions(model, [[True]] * n, then="full"))
        fastcache_fx.reset(model)

    fastcache_rows("fastcache block", {}, True)
    fastcache_rows("fastcache step", {"cache_level": "step"}, False)
    cg = cudagraph_options()
    if cg is None:
        rows.write(**common, variant="fastcache cudagraphs", status="skipped",
                   reason="this checkout has no CUDA-graph step lowering (issue 39 part 2)")
    elif device.type != "cuda":
        rows.write(**common, variant="fastcache cudagraphs", status="skipped", reason="CUDA graphs need a GPU")
    else:
        fastcache_rows("fastcache cudagraphs", cg, False)
    fbcache_rows(rows, model, steps, device, args, emit, need)
    if importlib.util.find_spec("torch_tensorrt") is None:
        rows.write(**common, variant="tensorrt", status="skipped", reason="torch-tensorrt is not installed")
    elif device.type == "cuda":
        fastcache_rows("fastcache tensorrt", {"lowering": "tensorrt"}, True)


def fbcache_rows(rows: Rows, model, steps, device, args, emit, need) -> None:
    """diffusers' FirstBlockCache on the same model and inputs, compiled by Inductor (its decision
    is a ``torch.compiler.disable`` function, a graph break per step): threshold 0 computes every
    step, a huge one reuses the cache after the first step (the forced all-full / all-approx)."""
    if not rows.has_time(need * 1.5, "fbcache"):
        return
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    def reset():
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)

    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    # the threshold is read inside the hook's torch.compiler.disable decision: changing it on the
    # hook needs no recompile (one compile serves both rows)
    heads = [h for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
             for h in m._diffusers_hook.hooks.values() if hasattr(h, "threshold")]
    try:
        torch.compiler.reset()
        c = torch.compile(model, dynamic=False)

        def call(**kw):
            with model.cache_context("cond"):
                return c(**kw)

        t0 = time.perf_counter()
        with torch.no_grad():
            call(**steps[0])
        build = time.perf_counter() - t0
        for label, thr, scales in (("fbcache all-full", 0.0, True), ("fbcache all-approx", 1e9, False)):
            for h in heads:
                h.threshold = thr
            reset()
            emit(label, call, build, before=reset, scales=scales,
                 extra={"peer": "diffusers FirstBlockCache (torch.compile, Inductor)", "threshold": thr})
    finally:
        model.disable_cache()
