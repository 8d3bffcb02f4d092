"""``fastcache-fx calibrate``: fit the linear block maps of the bundled reference DiT.

    fastcache-fx calibrate --model reference --samples 64 --steps 20 --out calib.safetensors
                           [--kind linear|residual_linear|stack_linear|stack_cached_linear] [--rank R] [--time-buckets K]

Samples ``--samples`` digits (classes 0..9 in turn, batched CFG, seeds ``--seed`` + i) with
``fastcache_fx.reference.sample`` on the uncompiled model while ``calibration.calibrate``
records every block, then writes the safetensors file for ``options={"approx": kind,
"calibration": path}``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import KINDS, STACK_KINDS, calibrate

MODELS = ("reference",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference", choices=MODELS, help="model to calibrate (default: reference)")
    p.add_argument("--samples", type=int, default=64, help="sampling trajectories (default 64)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per trajectory (default 20)")
    p.add_argument("--batch", type=int, default=16, help="trajectories per batch (default 16)")
    p.add_argument("--kind", default="linear", choices=KINDS + tuple(STACK_KINDS),
                   help="approximation to fit (default linear); stack_linear / stack_cached_linear: the block-stack "
                        "map of token selection (static_approx linear / cached_linear)")
    p.add_argument("--ridge", type=float, default=None, help="absolute ridge lambda (default: chosen by GCV)")
    p.add_argument("--rank", type=int, default=None, help="low-rank maps W = I + U V^T of this rank (default: full)")
    p.add_argument("--time-buckets", type=int, default=1, help="maps per block for K timestep ranges (default 1)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpmsolver", "euler"))
    p.add_argument("--seed", type=int, default=0, help="seed of the first trajectory (default 0)")
    p.add_argument("--out", type=Path, default=Path("calib.safetensors"), help="output file")
    p.add_argument("--no-progress", action="store_true")


def _load_reference():
    from .. import reference

    try:
        return reference, reference.load()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the reference DiT weights are not available yet ({e}); train them first "
                                "(python -m fastcache_fx.reference.train)") from None


def run(args) -> int:
    """Run the subcommand; prints one line per block and the output path.

    Raises:
        ValueError: a bad argument value (named).
        FileNotFoundError: the reference weights are missing.
    """
    for name in ("samples", "steps", "batch", "time_buckets"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.rank is not None and args.rank < 1:
        raise ValueError(f"--rank: must be >= 1, got {args.rank}")
    from tqdm.auto import tqdm

    reference, model = _load_reference()
    labels = torch.arange(args.samples) % 10

    def run_fn(m) -> None:
        with tqdm(total=args.samples, desc="calibrating", unit="sample", disable=args.no_progress) as bar:
            for start in range(0, args.samples, args.batch):
                chunk = labels[start:start + args.batch]
                reference.sample(m, chunk, num_inference_steps=args.steps, guidance_scale=args.guidance,
                                 scheduler=args.scheduler, seed=args.seed + start)
                bar.update(len(chunk))

    cal = calibrate(model, run_fn, out=args.out, kind=args.kind, ridge=args.ridge, rank=args.rank,
                    time_buckets=args.time_buckets)
    meta = cal.metadata
    for block, errs in meta["fit_error"].items():
        ridges = ", ".join("/".join(f"{x:.3g}" for x in (r if isinstance(r, list) else [r])) for r in meta["ridge"][block])
        print(f"{block}: {sum(meta['samples'][block])} token pairs, relative fit error "
              f"{', '.join(f'{e:.4f}' for e in errs)}, lambda {ridges}")
    opts = {"approx": args.kind, "calibration": str(args.out)}
    if args.kind in STACK_KINDS:
        opts = {"enable_spatial_approx": True, "static_approx": STACK_KINDS[args.kind], "calibration": str(args.out)}
    if args.rank is not None:
        opts["rank"] = args.rank
    if args.time_buckets > 1:
        opts["time_buckets"] = args.time_buckets
    print(f"wrote {args.out} (kind={args.kind}, width {meta['width']}, rank {meta['rank']}, "
          f"{meta['buckets']} time bucket(s), {len(meta['fit_error'])} blocks); use options={opts}")
    return 0
