"""Motion-aware token selection benchmark: speed per bucket and quality vs motion_threshold.

Speed (``--xl-layers L``): a DiT-XL/2-sized model (256 image tokens, width 1152, L blocks,
random weights, batch 2). Every bucket variant (25/50/75/100 % of the tokens) is forced in turn
(the runtime's next-bucket choice is overridden) and timed per step alternately with plain
Inductor in the same run (median of rounds); the block cache is compiled in but never approximates, so the
difference is the token selection alone.

Quality: the bundled reference DiT (64 tokens, 6 blocks, batched CFG, DDIM) samples the same
digits (same noise) with plain Inductor and with ``enable_spatial_approx=True`` at several
``motion_threshold`` values (block cache off, so only tokens are approximated): PSNR against
the Inductor images, digits-FID, class accuracy, the spatial approximation ratio and the
number of compiled variants. ``--model mmdit``: the same on the bundled MMDiT (SD3 joint blocks,
64 image + 4 class tokens, 28 flow-matching Euler steps of the real ``StableDiffusion3Pipeline``;
only the image tokens are selected), class accuracy / digits-FID on 2x2-pooled 8x8 images.

    python benchmarks/token_select.py --images 20 --steps 50 --xl-layers 2 --out benchmarks/token_select.json
    python benchmarks/token_select.py --model mmdit --xl-layers 0 --out benchmarks/token_select_mmdit.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import reference as R
from fastcache_fx import zoo
from fastcache_fx.reference.jobs import MODELS, job
from fastcache_fx.runtime import registry

THRESHOLDS = (0.0, 0.002, 0.01, 0.05)


def xl_rows(layers: int, calls: int, repeats: int) -> dict:
    """Seconds per step of each bucket variant and of plain Inductor (same inputs). The two are
    timed alternately (``repeats`` rounds of ``calls`` steps each, median kept), so a change of
    machine load between them does not bias the ratio."""
    import statistics

    clock = iter(range(999, -1, -1))  # decreasing timesteps: one trajectory, no restart

    def once(fn, before=None):
        t0 = time.perf_counter()
        for _ in range(calls):
            if before is not None:
                before()
            fn(**dict(kw, timestep=torch.full((2,), next(clock))))
        return (time.perf_counter() - t0) / calls

    model, kw = zoo.build("dit", "xl", num_layers=layers)
    rows = {}
    with torch.no_grad():
        torch._dynamo.reset()
        base = torch.compile(model, backend="inductor", dynamic=False)
        base(**kw)
        model2, _ = zoo.build("dit", "xl", num_layers=layers)
        c = torch.compile(model2, backend=fastcache_fx.FastCacheBackend(enable_spatial_approx=True,
                                                                          enable_block_approx=False), dynamic=False)
        for _ in range(3):  # warm-up steps (every token)
            c(**dict(kw, timestep=torch.full((2,), next(clock))))
        rt = registry.lookup(model2).graphs[-1]
        base_all = []
        for k in rt.buckets:
            force = lambda: rt.states["default"].__setitem__("next_k", k)  # noqa: E731
            force()
            c(**dict(kw, timestep=torch.full((2,), next(clock))))  # compiles the variant
            b, v = [], []
            for _ in range(repeats):
                b.append(once(base))
                v.append(once(c, force))
            base_all += b
            bs, vs = statistics.median(b), statistics.median(v)
            rows[f"token select k={k}"] = {"tokens": k, "seconds_per_step": vs, "inductor_seconds_per_step": bs,
                                           "speed_ratio": bs / vs}
            print(f"  xl k={k}: {bs / vs:.3f}x ({vs:.3f} s vs {bs:.3f} s)", flush=True)
        assert fastcache_fx.stats(model2)["token_select"]["variants_compiled"] == len(rt.buckets)
        rows = {"inductor": {"tokens": 256, "seconds_per_step": statistics.median(base_all),
                             "inductor_seconds_per_step": statistics.median(base_all), "speed_ratio": 1.0}, **rows}
    return rows


def xl_flops(layers: int) -> dict:
    """FLOPs per step of each bucket's graph (the pass output run eagerly, FlopCounterMode): the
    compute a variant saves, independent of machine load."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastcache_fx.passes.token_select import apply_token_select, bucket_sizes, image_tokens
    from fastcache_fx.passes.blocks import find_blocks

    model, kw = zoo.build("dit", "xl", num_layers=layers)
    cap = {}

    def capture(gm, example_inputs, **_):
        cap["gm"], cap["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(**kw)
        regions = find_blocks(cap["gm"]).regions
        n = image_tokens(regions)
        config = fastcache_fx.FastCacheConfig(enable_spatial_approx=True)
        out = {}
        for k in bucket_sizes(n, config.token_buckets):
            gm, res = apply_token_select(cap["gm"], config, k, regions)
            state = [torch.full(s.shape, s.fill, dtype=s.dtype) for s in res.state]
            state[2], state[3] = torch.tensor(0), torch.tensor(1000.0)  # a step after the first
            with FlopCounterMode(display=False) as fc:
                gm(*cap["inputs"], *state)
            out[k] = fc.get_total_flops()
    return {k: {"gflops": v / 1e9, "flops_ratio": out[n] / v} for k, v in out.items()}


def reference_rows(images: int, steps: int | None, thresholds, static=(("cached", None),), model: str = "dit") -> dict:
    """Quality and speed on bundled model ``model`` ("dit" or "mmdit", ``reference.jobs``) per
    motion_threshold and (static_approx, calibration path of its stack map) in ``static``.
    ``steps`` None: the model's default (50 DDIM / 28 flow Euler steps)."""
    j = job(model)
    steps = steps or j.steps
    labels = torch.arange(10).repeat_interleave(max(1, images // 10))[:images]
    seeds = [1000 + i for i in range(len(labels))]
    clf = R.load_classifier()
    small = j.to_classifier
    torch._dynamo.reset()
    base = j.inductor(j.load())
    j.sample(base, labels, steps=2, seeds=seeds)
    t0 = time.perf_counter()
    base_imgs = j.sample(base, labels, steps=steps, seeds=seeds)
    base_s = time.perf_counter() - t0
    rows = {"inductor": {"seconds_per_image": base_s / len(labels), "psnr_db": float("inf"),
                         "digits_fid": R.digits_fid(clf, small(base_imgs)),
                         "class_accuracy": R.class_accuracy(clf, small(base_imgs), labels),
                         "spatial_approx_ratio": 0.0, "variants_compiled": 0}}
    for thr, (sa, cal) in [(t, s) for t in thresholds for s in static]:
        model = j.load()
        c = j.fastcache(model, dict(enable_spatial_approx=True, enable_block_approx=False, motion_threshold=thr,
                                    static_approx=sa, calibration=cal))
        j.sample(c, labels, steps=steps, seeds=seeds)  # compiles the variants it needs
        fastcache_fx.reset(model)
        n0 = len(fastcache_fx.stats(model)["token_select"]["steps"])
        t0 = time.perf_counter()
        imgs = j.sample(c, labels, steps=steps, seeds=seeds)
        secs = time.perf_counter() - t0
        st = fastcache_fx.stats(model)["token_select"]
        timed = st["steps"][n0:]
        ratio = sum(r["n"] - r["k"] for r in timed) / max(1, sum(r["n"] for r in timed))
        name = f"motion_threshold={thr:g}" + (f" static_approx={sa}" if sa != "cached" else "")
        rows[name] = {"seconds_per_image": secs / len(labels),
                      "psnr_db": float(R.psnr(imgs, base_imgs).clamp_max(100).mean()),
                      "digits_fid": R.digits_fid(clf, small(imgs)),
                      "class_accuracy": R.class_accuracy(clf, small(imgs), labels),
                      "spatial_approx_ratio": ratio, "variants_compiled": st["variants_compiled"],
                      "tokens_per_step": [r["k"] for r in timed]}
        print(f"  {name}: PSNR {rows[name]['psnr_db']:.2f} dB, ratio {ratio:.3f}", flush=True)
    return rows


def _table(rows: dict, cols: list[str]) -> str:
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", choices=MODELS, help="bundled model of the quality rows")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 dit, 28 mmdit)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--xl-layers", type=int, default=2, help="blocks of the DiT-XL/2-sized speed rows (0: skip)")
    p.add_argument("--xl-calls", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--static-approx", nargs="+", default=["cached"], metavar="KIND[=PATH]",
                   help="static_approx values of the quality rows; linear / cached_linear need =PATH, a stack-map "
                        "calibration (fastcache-fx calibrate --kind stack_linear / stack_cached_linear)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/token_select.json"))
    a = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "machine": f"{platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()}".strip(),
              "torch": torch.__version__,
              "command": "python benchmarks/token_select.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.xl_layers:
        print(f"DiT-XL/2 width, {a.xl_layers} blocks, batch 2", flush=True)
        record["xl"] = {"layers": a.xl_layers, "rows": xl_rows(a.xl_layers, a.xl_calls, a.repeats)}
        flops = xl_flops(a.xl_layers)
        for k, f in flops.items():
            record["xl"]["rows"][f"token select k={k}"].update(f)
        record["xl"]["rows"]["inductor"].update(gflops=flops[max(flops)]["gflops"], flops_ratio=1.0)
        print(_table(record["xl"]["rows"], ["tokens", "seconds_per_step", "inductor_seconds_per_step", "speed_ratio",
                                            "gflops", "flops_ratio"]),
              flush=True)
    if not a.skip_quality:
        print(f"reference {a.model}: {a.images} images, {a.steps or job(a.model).steps} steps", flush=True)
        static = [tuple(v.split("=", 1)) if "=" in v else (v, None) for v in a.static_approx]
        record["model"] = a.model
        record["reference"] = reference_rows(a.images, a.steps, a.thresholds, static, model=a.model)
        print(_table(record["reference"], ["seconds_per_image", "psnr_db", "digits_fid", "class_accuracy",
                                           "spatial_approx_ratio", "variants_compiled"]))
    a.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
