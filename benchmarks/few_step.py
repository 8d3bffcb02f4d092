"""Few-step samplers under ``target_psnr`` (issue 37, part 4): at 4-8 steps the cache may
approximate only where the target allows, and must not be more than 3 % slower than plain
Inductor where it approximates nothing.

For each bundled model (``quality_target.Model``: the DiT and the unseen DiT with DDIM, the
MMDiT with flow Euler, batch 8, CFG batched) and step count, in one run: plain
``torch.compile`` (Inductor, default arguments but ``dynamic=False``), and ``enable_fastcache(...,
target_psnr=T)`` at the block and the step level (``quality_target.LEVELS``), each also with
every decision forced to compute (``replay_decisions``; rows ", none"): the same graph and the
same per-call work approximating nothing, i.e. the cache's own cost. Each variant is
warmed up once, then timed ``--repeats`` times, interleaved (Inductor, fastcache block, fastcache
step, Inductor, ...); the row keeps the fastest generation. Speed is the ratio against the
Inductor of the same run; PSNR against the eager model's samples of the same seeds. Prints a
table and writes JSON.

    python benchmarks/few_step.py --repeats 3                 # 4 and 8 steps, T = 35
    python benchmarks/few_step.py --models dit --steps 4 6 8 --target 40
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx.reference.metrics import psnr_db

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality_target import LEVELS, SETTINGS, Model  # noqa: E402


def run(args) -> list[dict]:
    rows = []
    for name in args.models:
        torch._dynamo.reset()
        model = Model(name, args.batch)
        sampler, g, cfg = SETTINGS[name][0][0], SETTINGS[name][1][0], SETTINGS[name][2][0]
        variants = {"inductor": (torch.compile(model._load(), dynamic=False), None)}
        for level in args.levels:  # one graph per level; the target is a control (set_target_psnr)
            runner = model.compiled(level, args.target)
            variants[f"fastcache {level}"] = (runner, args.target)
            variants[f"fastcache {level}, none"] = (runner, args.target)

        def gen(k, steps):
            runner, target = variants[k]
            if target is None:
                return model.sample(runner, sampler, g, cfg, steps)
            fastcache_fx.reset(runner)
            if not k.endswith(", none"):
                return model.sample(runner, sampler, g, cfg, steps)
            # every decision forced to "compute": the graph, its decisions and error sums and the
            # target's per-call work all run, nothing is approximated
            with fastcache_fx.replay_decisions(runner, [[False]], then="full"):
                return model.sample(runner, sampler, g, cfg, steps)

        for steps in args.steps:
            with torch.no_grad():
                ref = model.sample(model.eager, sampler, g, cfg, steps)
                times = {k: [] for k in variants}
                outs, approx = {}, {}
                for k, (runner, target) in variants.items():  # warm-up (compiles) and the samples compared
                    outs[k] = gen(k, steps)
                    if target is not None:
                        st = fastcache_fx.stats(runner if model.dit else runner.transformer)
                        approx[k] = st["block_approx_ratio"]
                for _ in range(args.repeats):
                    for k in variants:
                        t0 = time.perf_counter()
                        gen(k, steps)
                        times[k].append(time.perf_counter() - t0)
            base = min(times["inductor"])
            for k in variants:
                row = dict(model=name, sampler=sampler, steps=steps, variant=k, target=args.target,
                           seconds=round(min(times[k]), 4), all_seconds=[round(t, 4) for t in times[k]],
                           speed_vs_inductor=round(base / min(times[k]), 3), psnr=round(psnr_db(outs[k], ref), 2),
                           approx=round(approx.get(k, 0.0), 3))
                rows.append(row)
                print(f"{name:10s} {sampler:10s} {steps:2d} steps {k:22s} {row['seconds']:8.3f} s  "
                      f"{row['speed_vs_inductor']:5.2f}x  PSNR {row['psnr']:6.2f}  approx {row['approx']:.2f}",
                      flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "dit_unseen", "mmdit"])
    p.add_argument("--steps", nargs="+", type=int, default=[4, 8])
    p.add_argument("--levels", nargs="+", default=["block", "step"], choices=list(LEVELS))
    p.add_argument("--target", type=float, default=35.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "few_step.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    rows = run(a)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    a.out.write_text(json.dumps(dict(rows=rows, date=datetime.date.today().isoformat(), commit=commit,
                                     argv=sys.argv[1:], torch=torch.__version__,
                                     note="fastest of --repeats generations, interleaved; speed vs the Inductor "
                                          "of the same run"), indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
