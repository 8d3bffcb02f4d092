"""Token-merge pyramid benchmark: speed ratio vs plain Inductor and image quality.

On the bundled reference DiT (64 tokens, 6 blocks, batched CFG) it samples the same grid of
digits (same initial noise) with plain ``torch.compile`` (Inductor) and with
``backend="fastcache"`` at merge_ratio 0.75 and 0.5, alone (block cache compiled in but never
approximating) and combined with the block cache (default thresholds). It reports seconds per
image, the speed ratio against Inductor measured in the same run, PSNR against the Inductor
images, digits-FID and class accuracy, and the tokens per stage. ``--xl-layers L`` adds a
speed-only row on a DiT-XL/2-sized model (256 tokens, width 1152, L blocks, random weights).

    python benchmarks/token_merge.py --images 20 --steps 50 --out benchmarks/token_merge.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import reference as R
from fastcache_fx import zoo

VARIANTS = {
    "fastcache, approximation off": dict(enable_block_approx=False),
    "merge 0.75": dict(enable_token_merge=True, merge_ratio=0.75, enable_block_approx=False),
    "merge 0.5": dict(enable_token_merge=True, merge_ratio=0.5, enable_block_approx=False),
    "block cache": dict(),
    "block cache + merge 0.75": dict(enable_token_merge=True, merge_ratio=0.75),
    "block cache + merge 0.5": dict(enable_token_merge=True, merge_ratio=0.5),
}


def reference_rows(images: int, steps: int, repeats: int, on_round=None) -> dict:
    """Compile every method first, then sample with all of them in lockstep (``_lockstep``);
    with ``repeats`` > 1 the best time of each method is kept."""
    labels = torch.arange(10).repeat_interleave(max(1, images // 10))[:images]
    seeds = [1000 + i for i in range(len(labels))]
    clf = R.load_classifier()
    torch._dynamo.reset()
    methods = {"inductor": (torch.compile(R.load(), backend="inductor", dynamic=False), None, None)}
    for name, opts in VARIANTS.items():
        model = R.load()
        methods[name] = (torch.compile(model, backend=fastcache_fx.FastCacheBackend(**opts), dynamic=False), model,
                         lambda m=model: fastcache_fx.reset(m))
    for name, (fn, _, _) in methods.items():
        t0 = time.perf_counter()
        R.sample(fn, labels, num_inference_steps=2, seed=seeds)  # compiles
        print(f"  compiled {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    best = {name: float("inf") for name in methods}
    images_of = {}
    for r in range(repeats):
        for name, (_, _, reset) in methods.items():
            if reset is not None:
                reset()
        images_of, secs = _lockstep({k: v[0] for k, v in methods.items()}, labels, steps, seeds)
        best = {k: min(best[k], secs[k]) for k in methods}
        print(f"  round {r + 1}/{repeats}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), flush=True)
        if on_round is not None:
            on_round(_rows(methods, best, images_of, labels, clf, steps), r + 1)
    return _rows(methods, best, images_of, labels, clf, steps)


def _lockstep(fns: dict, labels, steps: int, seeds, guidance: float = 2.0):
    """``fastcache_fx.reference.sample`` (DDIM, batched CFG) for every method at once: step i of
    every method runs before step i + 1 of any (in rotating order), and only the transformer
    calls are timed, so load changes on a shared machine hit all methods alike.

    Returns ({name: images [B, 1, 8, 8]}, {name: seconds in transformer calls})."""
    from fastcache_fx.reference.model import NULL_CLASS
    from fastcache_fx.reference.sampling import initial_noise, make_scheduler

    b = len(labels)
    cfg_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
    state, secs = {}, {k: 0.0 for k in fns}
    for k in fns:
        sched = make_scheduler("ddim")
        sched.set_timesteps(steps)
        state[k] = [sched, initial_noise(seeds) * sched.init_noise_sigma]
    names = list(fns)
    with torch.no_grad():
        for i, t in enumerate(state[names[0]][0].timesteps):
            for k in names[i % len(names):] + names[:i % len(names)]:
                sched, x = state[k]
                xin = sched.scale_model_input(torch.cat([x, x]), t)
                tt = t.expand(2 * b).contiguous() if t.ndim == 0 else t
                t0 = time.perf_counter()
                out = fns[k](xin, timestep=tt, class_labels=cfg_labels).sample
                secs[k] += time.perf_counter() - t0
                cond, uncond = out.chunk(2)
                state[k][1] = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return {k: state[k][1].clamp(-1, 1) for k in fns}, secs


def _rows(methods, best, images_of, labels, clf, steps) -> dict:
    n, base = len(labels), images_of["inductor"]
    rows = {}
    for name, (_, model, _) in methods.items():
        imgs = images_of[name]
        st = fastcache_fx.stats(model) if model is not None else None
        timed = st["trace"][-steps:] if st else []
        ratio = sum(sum(t["approx"]) for t in timed) / max(1, sum(len(t["approx"]) for t in timed))
        rows[name] = {"seconds_per_image": best[name] / n, "speed_ratio": best["inductor"] / best[name],
                      "psnr_db": R.psnr_db(imgs, base),
                      "digits_fid": R.digits_fid(clf, imgs), "class_accuracy": R.class_accuracy(clf, imgs, labels),
                      "block_approx_ratio": ratio,
                      "tokens_per_stage": ((st or {}).get("token_merge") or {}).get("tokens_per_stage", [64])}
    return rows


def xl_rows(layers: int, steps: int, repeats: int) -> dict:
    """Speed only: DiT-XL/2 width (256 tokens, 1152) with ``layers`` blocks, batch 2, ``steps``
    calls per trajectory, methods timed in interleaved rounds."""
    names = ["inductor", "fastcache, approximation off", "merge 0.75", "merge 0.5"]
    torch._dynamo.reset()
    methods = {}
    for name in names:
        model, kw = zoo.build("dit", "xl", num_layers=layers)
        backend = "inductor" if name == "inductor" else fastcache_fx.FastCacheBackend(**VARIANTS[name])
        methods[name] = (torch.compile(model, backend=backend, dynamic=False), model)
    best = {name: float("inf") for name in names}
    with torch.no_grad():
        for name, (fn, _) in methods.items():
            fn(**kw)  # compile
        for _ in range(repeats):
            for name, (fn, model) in methods.items():
                if name != "inductor":
                    fastcache_fx.reset(model)
                t0 = time.perf_counter()
                for i in range(steps):
                    fn(**dict(kw, timestep=torch.full((2,), 999 - 20 * i)))
                best[name] = min(best[name], time.perf_counter() - t0)
    rows = {}
    for name, (_, model) in methods.items():
        tm = fastcache_fx.stats(model)["token_merge"] if name != "inductor" else None
        rows[name] = {"seconds_per_step": best[name] / steps, "speed_ratio": best["inductor"] / best[name],
                      "tokens_per_stage": tm["tokens_per_stage"] if tm else [256]}
    return rows


def _table(rows: dict, cols: list[str]) -> str:
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = [(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c])) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed trajectories per method (best is kept)")
    p.add_argument("--xl-layers", type=int, default=0, help="blocks of the DiT-XL/2-sized speed row (0: skip)")
    p.add_argument("--xl-steps", type=int, default=5)
    p.add_argument("--xl-only", action="store_true", help="only the XL row, added to the existing --out file")
    p.add_argument("--out", type=Path, default=Path("benchmarks/token_merge.json"))
    a = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
              "machine": f"{platform.machine()} {platform.processor() or ''} cpus={torch.get_num_threads()}".strip(),
              "torch": torch.__version__, "command": "python benchmarks/token_merge.py " + " ".join(argv or __import__("sys").argv[1:]),
              "images": a.images, "steps": a.steps, "repeats": a.repeats}
    if a.xl_only:
        record = {**json.loads(a.out.read_text()), "xl_date": record["date"], "xl_commit": commit,
                  "xl_command": record["command"]}
        a.xl_layers = a.xl_layers or 2
        print(f"DiT-XL/2 width, {a.xl_layers} blocks: {a.xl_steps} steps", flush=True)
        record["xl"] = {"layers": a.xl_layers, "steps": a.xl_steps, "rows": xl_rows(a.xl_layers, a.xl_steps, a.repeats)}
        print(_table(record["xl"]["rows"], ["seconds_per_step", "speed_ratio", "tokens_per_stage"]))
        a.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return 0
    print(f"reference DiT: {a.images} images, {a.steps} steps", flush=True)
    def save(rows, rounds):  # after every timing round, so a cut-off run leaves its numbers
        record["reference"], record["rounds_done"] = rows, rounds
        a.out.write_text(json.dumps(record, indent=2, default=str) + "\n")

    record["reference"] = reference_rows(a.images, a.steps, a.repeats, on_round=save)
    print(_table(record["reference"], ["seconds_per_image", "speed_ratio", "psnr_db", "digits_fid",
                                       "class_accuracy", "block_approx_ratio", "tokens_per_stage"]))
    if a.xl_layers:
        print(f"DiT-XL/2 width, {a.xl_layers} blocks: {a.xl_steps} steps", flush=True)
        record["xl"] = {"layers": a.xl_layers, "steps": a.xl_steps, "rows": xl_rows(a.xl_layers, a.xl_steps, a.repeats)}
        print(_table(record["xl"]["rows"], ["seconds_per_step", "speed_ratio", "tokens_per_stage"]))
    a.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
