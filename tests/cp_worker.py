"""Worker of the context-parallel tests: ``python tests/cp_worker.py FAMILY[-LEVEL] OUT.pt``
(``flux-step``: Flux at ``cache_level="step"``, without the near-bound step), or
``python tests/cp_worker.py repro OUT.pt OPTIONS_JSON``: the trajectory of issue 36
(``repro_worker``: a bare ``torch.compile`` with no warm-up trajectory before it).

Spawns 2 gloo processes on this CPU. Each builds the same tiny model (same seed), enables
diffusers context parallelism (Ulysses degree 2, native attention) and compiles it with
``backend="fastcache"``; rank 0 also runs the same model in one process (no parallelism, also
fastcache) as the reference. Both run two scripted trajectories:

- ``off``: 3 steps with every decision forced to a full computation (``replay_decisions``), the
  equivalent of ``enable_block_approx=False`` without a second compile;
- ``on``: live decisions on a trajectory whose input is unchanged for 4 steps, then changes in
  the second half of the tokens only (rank 1's shard), then stays: without the all-reduce of
  the decision sums, rank 0 would approximate the blocks that rank 1 computes, and hang. With
  ``near_bound`` (this worker; not xDiT's) a 7th step changes the input so that the first
  block's delta lies between the chi-square bound of the whole sequence (one process: the
  block is computed) and the bound of one rank's shard (half the elements: a looser bound,
  which context parallelism used before the bound took ND of the whole sequence).

Rank 0 saves {"cp": ..., "single": ...} with per-step outputs, decision traces and the graphs'
process groups to OUT.pt. The test runs this under a timeout, so a hang fails instead of blocking.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def build(family: str):
    """(model, kwargs, timesteps) of a tiny family with diffusers' context-parallel plan."""
    from fastcache_fx import zoo

    if family == "flux":
        model, kw = zoo.build("flux", batch=1)
        return model, kw, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    if family == "qwenimage":  # an MMDiT (joint text/image blocks) that diffusers can parallelise
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(0)
        model = QwenImageTransformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                            axes_dims_rope=(4, 6, 6)).eval().requires_grad_(False)
        kw = dict(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 6, 12),
                  timestep=torch.full((1,), 0.9),
                  img_shapes=[(1, 4, 4)])
        return model, kw, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    if family == "wan":  # a video DiT: [B, C, F, H, W] latents, diffusers' Wan _cp_plan (Ulysses)
        from diffusers import WanTransformer3DModel

        torch.manual_seed(0)
        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                      rope_max_seq_len=32).eval().requires_grad_(False)
        # 2 frames of 4x4 tokens: rank 0 holds frame 0, rank 1 frame 1
        kw = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  timestep=torch.full((1,), 0.9))
        return model, kw, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    raise ValueError(f"family: expected flux, qwenimage or wan, got {family!r}")


def first_block(model):
    """The first transformer block (Wan's list is ``blocks``)."""
    return model.blocks[0] if hasattr(model, "blocks") else model.transformer_blocks[0]


def stream_inputs(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """A block call's residual streams: the 3-D tensors it gets (Flux, QwenImage: image and text),
    or, for a Wan block (called positionally: hidden, text, timestep projection, rotary), the first."""
    if args:
        return [args[0]]
    return [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.dim() == 3]


def shifted(x: torch.Tensor) -> torch.Tensor:
    """The ``on`` trajectory's input from step 4: only the second half of the tokens changes
    (packed tokens [B, N, C]: dim 1; video latents [B, C, F, H, W]: the second half of the frames)."""
    x2 = x.clone()
    d = 2 if x.dim() == 5 else 1
    half = [slice(None)] * d + [slice(x.shape[d] // 2, None)]
    x2[tuple(half)] += 0.5 * x[tuple(half)].std()  # only the second shard changes
    return x2


def near_bound_input(family: str, tau: float, world: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """(the 7th input of ``on``, (lo, hi)): x2 + s d, with s putting the first block's delta
    against its anchor (the step-4 input x2) at sqrt(lo * hi), lo = tau sqrt(chi2.ppf(0.95, ND) /
    ND) for ND of the whole sequence, hi the same for ND / ``world`` (one rank's shard). Found on
    the plain model in eager mode (its stream inputs are affine in x, so delta is linear in s)."""
    from fastcache_fx.ops.decision import chi2_quantile_ratio

    model, kw, _ = build(family)
    got = []
    hook = first_block(model).register_forward_pre_hook(lambda m, a, k: got.append(stream_inputs(a, k)),
                                                         with_kwargs=True)
    x2 = shifted(kw["hidden_states"])
    d = torch.randn(x2.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for x in (x2, x2 + d):
            model(**dict(kw, hidden_states=x), return_dict=False)
    hook.remove()
    (a, h) = got
    delta1 = (sum((u - v).pow(2).sum() for u, v in zip(h, a)) / sum(v.pow(2).sum() for v in a)).sqrt().item()
    nd = sum(v[0].numel() for v in a)
    lo, hi = (tau * chi2_quantile_ratio(0.05, n) ** 0.5 for n in (nd, nd // world))
    return x2 + ((lo * hi) ** 0.5 / delta1) * d, (lo, hi)


def trajectories(model, compiled, kw, timesteps, near_bound: torch.Tensor | None = None) -> dict:
    """Run the two scripted trajectories; returns outputs and decision traces (and the
    per-block bounds). ``near_bound``: the input of a 7th ``on`` step (``near_bound_input``)."""
    import fastcache_fx

    out = {}
    fastcache_fx.reset(model)
    with fastcache_fx.replay_decisions(model, [[False] * 8] * 3, then="full"):
        out["off"] = [compiled(**dict(kw, timestep=torch.full((1,), t)), return_dict=False)[0] for t in timesteps[:3]]
    out["off_trace"] = [t["approx"] for t in fastcache_fx.stats(model)["trace"]]
    fastcache_fx.reset(model)
    x = kw["hidden_states"]
    x2 = shifted(x)
    xs = [x, x, x, x, x2, x2] + ([near_bound] if near_bound is not None else [])
    out["on"] = [compiled(**dict(kw, hidden_states=xi, timestep=torch.full((1,), t)), return_dict=False)[0]
                 for xi, t in zip(xs, timesteps)]
    st = fastcache_fx.stats(model)
    out["on_trace"] = [t["approx"] for t in st["trace"]]
    out["on_delta"] = [t["delta"] for t in st["trace"]]
    out["on_threshold"] = [t["threshold"] for t in st["trace"]]
    return out


def worker(rank: int, world: int, family: str, path: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # diffusers' _resolve_parallel_config computes rank % torch.accelerator.device_count(), which
    # is 0 on a CPU-only machine; the tests (never the library) patch it to 1
    torch.accelerator.device_count = lambda: 1
    import fastcache_fx
    from diffusers import ContextParallelConfig
    from fastcache_fx.runtime import registry

    opts = {"cache_ratio_threshold": 0.05, "warmup_steps": 2, "max_consecutive_approx": 3}
    family, _, level = family.partition("-")  # "flux-step": the step level (one decision for the span)
    if level:  # the near-bound step is about the first block's own input: block level only
        opts["cache_level"] = level
        x3, window = None, None
    else:
        x3, window = near_bound_input(family, opts["cache_ratio_threshold"], world)
    model, kw, ts = build(family)
    model.set_attention_backend("native")
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    fastcache_fx.traceable_hooks(model)  # Wan: the plan hooks blocks.0 (enable_fastcache does this itself)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(**opts))
    res = {"cp": trajectories(model, compiled, kw, ts, near_bound=x3), "near_bound": window}
    graphs = registry.lookup(model).graphs
    res["cp"]["groups"] = [g.layout.groups for g in graphs if hasattr(g, "layout")]  # glue graphs have none
    res["cp"]["fallback"] = fastcache_fx.stats(model)["fallback"]
    res["cp"]["trace_rank"] = rank
    gathered = [None] * world
    dist.all_gather_object(gathered, res["cp"]["on_trace"])
    res["cp"]["traces_of_ranks"] = gathered
    if rank == 0:
        single, kw1, _ = build(family)
        res["single"] = trajectories(single, torch.compile(single, backend=fastcache_fx.FastCacheBackend(**opts)),
                                     kw1, ts, near_bound=x3)
        torch.save(res, path)
    dist.barrier()
    dist.destroy_process_group()


# the issue-36 trajectory: Flux, 1 double + 2 single blocks, 16 image + 6 text tokens, timesteps 1.0 ... 0.7,
# the input constant for 4 steps, then only rank 1's shard (the second half of the image tokens) changes
REPRO_STEPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def build_repro():
    """(model, latents [1, 16, 4], kwargs) of the issue-36 repro (``repro_trajectory``)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=[2, 2, 4]).eval()
    x, enc, pooled = torch.randn(1, 16, 4), torch.randn(1, 6, 16), torch.randn(1, 8)
    ij = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2).float()
    kw = dict(encoder_hidden_states=enc, pooled_projections=pooled, img_ids=torch.cat([torch.zeros(16, 1), ij], 1),
              txt_ids=torch.zeros(6, 3), return_dict=False)
    return m, x, kw


def repro_trajectory(model, compiled, x, kw) -> dict:
    """The outputs of the 7 steps and ``stats()``: the share approximated, the per-step trace."""
    import fastcache_fx

    outs = []
    with torch.no_grad():
        for i, t in enumerate(REPRO_STEPS):
            xi = x.clone()
            if i >= 4:
                xi[:, 8:] += 3.0  # only the tokens of rank 1's shard change
            outs.append(compiled(xi, timestep=torch.tensor([t]), **kw)[0])
    st = fastcache_fx.stats(model)
    return {"outs": outs, "ratio": st["block_approx_ratio"], "graphs": st["graphs"],
            "trace": [(r["step"], r["approx"], r["delta"]) for r in st["trace"]]}


def repro_worker(rank: int, world: int, options: dict, path: str) -> None:
    """One rank of the repro under Ulysses ``world`` (bare ``torch.compile``, as a user writes it);
    rank 0 also runs the one-process reference (the same model, no parallelism) and saves
    {"ranks": [per rank], "single": ...} to ``path``."""
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.accelerator.device_count = lambda: 1  # as in ``worker``
    import fastcache_fx  # noqa: F401  (registers the backend)
    from diffusers import ContextParallelConfig

    m, x, kw = build_repro()
    m.set_attention_backend("native")
    m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    mine = repro_trajectory(m, torch.compile(m, backend="fastcache", options=options), x, kw)
    ranks = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank == 0:
        single, x1, kw1 = build_repro()
        ref = repro_trajectory(single, torch.compile(single, backend="fastcache", options=options), x1, kw1)
        torch.save({"ranks": ranks, "single": ref}, path)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    """``cp_worker.py FAMILY OUT.pt`` (``worker``) or ``cp_worker.py repro OUT.pt OPTIONS_JSON``
    (``repro_worker``)."""
    import json

    import torch.multiprocessing as mp

    argv = argv or sys.argv[1:]
    family, path = argv[:2]
    port = str(29500 + os.getpid() % 1000)
    os.environ["MASTER_PORT"] = port
    if family == "repro":
        mp.spawn(repro_worker, args=(2, json.loads(argv[2]), path), nprocs=2)
    else:
        mp.spawn(worker, args=(2, family, path), nprocs=2)


if __name__ == "__main__":
    main()
