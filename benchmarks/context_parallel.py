"""The block cache under diffusers context parallelism: speed of plain Inductor vs fastcache.

Two gloo processes on this CPU (Ulysses degree 2, diffusers' native attention), a Flux-type
``FluxTransformer2DModel`` with random weights and 1024 image tokens (32 x 32, patch 1) plus 64
text tokens. Each variant samples one flow-matching trajectory (Euler steps on the model's own
velocity, batch 1) from the same noise, after one untimed warm-up trajectory that compiles:

- ``inductor``: ``torch.compile(model)`` under context parallelism;
- ``fastcache, approximation off``: the same with ``enable_block_approx=False`` (the cost of the
  guarded graph and the decision all-reduce alone);
- ``fastcache``: ``torch.compile(model, backend="fastcache")`` under context parallelism.

Reported per variant (rank 0; every rank takes the same decisions): mean step seconds over the
trajectory (the fastest of ``--repeats`` trajectories; a median step would hide the approximated
steps when fewer than half of them are), the
speed ratio to Inductor measured in the same run, the approximated share of block-steps, PSNR
of the final latent against Inductor's, and the bytes all-reduced per step for the decisions
(2 float32 per sample and block: the sums ||H - A||^2 and ||A||^2). On a CPU the ratio is the
claim, not the absolute times.

    python benchmarks/context_parallel.py [--steps 20] [--tokens 1024] [--threshold 0.05] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastcache_fx.reference.metrics import psnr_db


def build(tokens: int, seed: int = 0):
    """(model, kwargs) of a Flux-type model with ``tokens`` image tokens (a square grid)."""
    from diffusers import FluxTransformer2DModel

    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"--tokens: expected a square number, got {tokens}")
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                   pooled_projection_dim=32, axes_dims_rope=(8, 12, 12)).eval().requires_grad_(False)
    txt = 64
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)),
                                     indexing="ij"), -1).reshape(tokens, 3)
    kw = dict(hidden_states=torch.randn(1, tokens, 16), encoder_hidden_states=torch.randn(1, txt, 64),
              pooled_projections=torch.randn(1, 32), img_ids=ids, txt_ids=torch.zeros(txt, 3))
    return model, kw


def sample(fn, kw, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Euler flow matching from kw's noise, sigma 1 -> 0; returns (final latent, step seconds)."""
    x = kw["hidden_states"].clone()
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            v = fn(**dict(kw, hidden_states=x, timestep=sigmas[i:i + 1]), return_dict=False)[0]
        times.append(time.perf_counter() - t0)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, times


def worker(rank: int, world: int, a, path: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, a.threads))
    torch.accelerator.device_count = lambda: 1  # diffusers divides by it; 0 on a CPU-only machine
    import fastcache_fx
    from diffusers import ContextParallelConfig
    from fastcache_fx.runtime import registry

    rows, ref = [], None
    for variant in ("inductor", "fastcache, approximation off", "fastcache"):
        torch._dynamo.reset()
        model, kw = build(a.tokens)
        model.set_attention_backend("native")
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        backend = "inductor" if variant == "inductor" else fastcache_fx.FastCacheBackend(
            cache_ratio_threshold=a.threshold, timestep_max=1.0, enable_block_approx=variant == "fastcache")
        fn = torch.compile(model, backend=backend)
        t0 = time.perf_counter()
        sample(fn, kw, a.steps)  # compiles
        warm = time.perf_counter() - t0
        best, x = None, None
        for _ in range(a.repeats):
            if variant != "inductor":
                fastcache_fx.reset(model)
            x, times = sample(fn, kw, a.steps)
            mean = statistics.fmean(times)
            best = mean if best is None else min(best, mean)
        row = {"variant": variant, "warmup_s": warm, "step_s": best}
        if variant == "inductor":
            ref = x
        else:
            st = fastcache_fx.stats(model)
            blocks = len(st["blocks"])
            groups = len(registry.lookup(model).graphs[0].layout.groups)
            row.update(approx_ratio=st["block_approx_ratio"], blocks=blocks, groups=groups,
                       allreduce_bytes_per_step=2 * 4 * x.shape[0] * blocks * groups)
            row["psnr_db_vs_inductor"] = psnr_db(x, ref, data_range=None)
        rows.append(row)
    if rank == 0:
        torch.save(rows, path)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threshold", type=float, default=0.05, help="cache_ratio_threshold")
    p.add_argument("--repeats", type=int, default=2, help="timed trajectories per variant (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (2 processes share the cores)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/context_parallel.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 300))
    path = os.path.join(tempfile.mkdtemp(), "rows.pt")
    mp.spawn(worker, args=(2, a, path), nprocs=2)
    rows = torch.load(path, weights_only=False)
    base = rows[0]["step_s"]
    for r in rows:
        r["speedup"] = base / r["step_s"]
    print("| variant (Ulysses 2, gloo) | step (s) | speedup vs Inductor | approximated | PSNR vs Inductor (dB) "
          "| decision all-reduce bytes / step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_s']:.3f} | {r['speedup']:.2f}x | {r.get('approx_ratio', 0):.2f} | "
              f"{r.get('psnr_db_vs_inductor', float('inf')):.1f} | {r.get('allreduce_bytes_per_step', 0)} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"rows": rows, "args": vars(a) | {"out": str(a.out)}, "commit": commit, "date": time.strftime("%Y-%m-%d"),
              "machine": {"platform": platform.platform(), "load_avg": list(os.getloadavg())},
              "command": "python benchmarks/context_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
