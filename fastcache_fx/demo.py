"""``fastcache-fx demo``: plain ``torch.compile`` vs ``backend="fastcache"`` on a bundled model.

``--model dit`` (default): the reference DiT, sampled by our DDIM loop. ``--model mmdit``: the
flow-matching MMDiT (``SD3Transformer2DModel``), sampled by the real ``StableDiffusion3Pipeline``
with ``fastcache_fx.enable_fastcache(pipe)`` on the fastcache side. ``--model wan``: the video
DiT (``WanTransformer3DModel``) in the real ``WanPipeline`` (separate cond / uncond calls), 4-frame
clips of moving digits; its table adds ``temporal_psnr_db`` (motion-compensated PSNR between
consecutive frames: flicker lowers it) and its PNG shows each clip's frames side by side. All go
through ``reference.jobs.ReferenceJob``.

Generates the same grid (classes x seeds, same initial noise) with both, prints a table
(seconds per image, speedup, block_approx_ratio, PSNR, SSIM, class accuracy, digits-FID) and
writes ``demo.png`` (baseline | fastcache | |difference|) and ``demo.json``. PSNR and SSIM
compare the generated images (16x16 for the MMDiT); class accuracy and digits-FID use the 8x8
classifier, on 2x2-average-pooled images for the MMDiT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import reference as R
from .config import FastCacheConfig
from .reference.jobs import MODELS, job
from .runtime.stats import block_share


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="dit", choices=MODELS,
                   help="bundled model: dit (DDIM, default), mmdit (SD3 pipeline, rectified flow) or wan "
                        "(WanPipeline, a video DiT: 4-frame clips of moving digits)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 dit, 28 mmdit, 20 wan)")
    p.add_argument("--seeds", type=int, default=4, help="samples per class (default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed trajectories per method, the fastest counts (default 3)")
    p.add_argument("--classes", type=str, default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 2.0 dit, the model's recorded scale for mmdit)")
    p.add_argument("--scheduler", default=None,
                   help=f"dit: one of {R.sampling.SCHEDULERS} (default ddim); mmdit: flow_euler; wan: unipc")
    p.add_argument("--error-budget", type=float, default=None,
                   help="error_budget of the default decision rule (default: library default)")
    p.add_argument("--threshold", type=float, default=None,
                   help="cache_ratio_threshold (selects the chi-square rule unless --decision says otherwise)")
    p.add_argument("--decision", choices=("output", "chi2", "error"), default=None, help="decision rule (default: library default)")
    p.add_argument("--approx", choices=("residual", "taylor"), default=None, help="approximation (default: residual)")
    p.add_argument("--significance", type=float, default=None, help="significance_level")
    p.add_argument("--warmup", type=int, default=None, help="warmup_steps")
    p.add_argument("--max-consecutive", type=int, default=None, help="max_consecutive_approx")
    p.add_argument("--out-png", type=Path, default=Path("demo.png"))
    p.add_argument("--out-json", type=Path, default=Path("demo.json"))
    p.add_argument("--trace-png", type=Path, default=None,
                   help="decision heat map (blocks x steps); default: <out-png stem>_trace.png")
    p.add_argument("--no-progress", action="store_true")


def _options(a) -> dict:
    opts = {"error_budget": a.error_budget, "cache_ratio_threshold": a.threshold, "decision": a.decision,
            "approx": a.approx, "significance_level": a.significance,
            "warmup_steps": a.warmup, "max_consecutive_approx": a.max_consecutive}
    opts = {k: v for k, v in opts.items() if v is not None}
    FastCacheConfig.from_options(opts)  # ValueError naming the field, before any work
    return opts


def _labels(a) -> torch.Tensor:
    try:
        classes = [int(c) for c in a.classes.split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--classes: expected comma-separated digits, got {a.classes!r}") from None
    if not classes or any(c < 0 or c > 9 for c in classes):
        raise ValueError(f"--classes: digits must be in 0..9, got {a.classes!r}")
    if a.seeds < 1 or a.repeats < 1:
        raise ValueError("--seeds and --repeats: must be >= 1")
    if a.steps < 1:
        raise ValueError("--steps: must be >= 1")
    return torch.tensor(classes).repeat_interleave(a.seeds)


def _resolve(a):
    """The model's job, with ``a.steps``, ``a.guidance`` and ``a.scheduler`` filled from its defaults."""
    j = job(getattr(a, "model", "dit"))
    a.steps = j.steps if a.steps is None else a.steps
    a.guidance = j.guidance if a.guidance is None else a.guidance
    try:
        a.scheduler = j.check_scheduler(a.scheduler)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    return j


def timed_sampling(j, transformer, labels, a, seeds, reset=None):
    """Compile (a 2-step warm-up run), then time ``a.repeats`` full trajectories of ``a.steps``
    steps; the fastest counts (one trajectory on a shared CPU varies by ~10 %).

    Returns (images [B, 1, S, S] of the last trajectory, seconds). ``reset`` is called before
    every run after the warm-up (the trajectories are identical: fixed seeds)."""
    from .tune import fastest_run

    def trajectory(steps, progress=False):
        return lambda fn: j.sample(fn, labels, steps=steps, guidance=a.guidance, scheduler=a.scheduler, seeds=seeds,
                                   progress=progress)

    return fastest_run(transformer, trajectory(a.steps, not a.no_progress), a.repeats, reset or (lambda: None),
                       warmup=trajectory(2))


def last_trajectory(st: dict, steps: int) -> list[dict]:
    """The ``stats()`` trace entries of the last ``steps``-step trajectory: ``steps`` per cache context
    (Wan's pipeline calls the transformer twice a step, under "cond" and "uncond")."""
    return st["trace"][-steps * max(1, len(st["trajectory"])):]


def quality_row(j, clf, imgs, labels, reference=None) -> dict:
    """PSNR / SSIM against ``reference`` (same seeds; none: inf / 1), class accuracy and digits-FID
    on the classifier's 8x8 view of ``imgs`` (per frame for a video model, which also gets the
    motion-compensated PSNR between consecutive frames, ``temporal_psnr_db``)."""
    small = j.to_classifier(imgs)
    row = {"psnr_db": float("inf") if reference is None else R.psnr_db(imgs, reference),
           "ssim": 1.0 if reference is None else float(R.ssim(j.as_images(imgs), j.as_images(reference)).mean()),
           "class_accuracy": R.class_accuracy(clf, small, j.classifier_labels(labels)),
           "digits_fid": R.digits_fid(clf, small)}
    if j.frames > 1:
        row["temporal_psnr_db"] = j.temporal_psnr(imgs)
    return row


def run(a) -> int:
    import fastcache_fx

    j = _resolve(a)
    opts = _options(a)
    labels = _labels(a)
    seeds = [1000 + i for i in range(len(labels))]
    model = j.load()
    clf = R.load_classifier()
    torch.compiler.reset()
    baseline = j.inductor(model)
    print(f"[1/2] {j.name}: plain torch.compile (Inductor): {len(labels)} images, {a.steps} steps")
    base_imgs, base_s = timed_sampling(j, baseline, labels, a, seeds)
    model_fc = j.load()  # a separate module: its own cache state, same weights
    fc = j.fastcache(model_fc, opts)
    print(f"[2/2] {j.name}: backend='fastcache' {opts or '(defaults)'}")
    fc_imgs, fc_s = timed_sampling(j, fc, labels, a, seeds, reset=lambda: fastcache_fx.reset(model_fc))
    st = fastcache_fx.stats(model_fc)
    # the timed trajectory only (the warm-up run's steps come first)
    timed = last_trajectory(st, a.steps)
    approx_ratio = block_share(timed)

    n = len(labels)
    rows = {
        "inductor": {"seconds_per_image": base_s / n, "speedup": 1.0, "block_approx_ratio": 0.0,
                     **quality_row(j, clf, base_imgs, labels)},
        "fastcache": {"seconds_per_image": fc_s / n, "speedup": base_s / fc_s, "block_approx_ratio": approx_ratio,
                      **quality_row(j, clf, fc_imgs, labels, reference=base_imgs)},
    }
    _print_table(rows)
    _save_png(a.out_png, base_imgs, fc_imgs, labels, rows, frames=j.frames)
    from .debug.heatmap import decision_heatmap

    trace_png = a.trace_png or a.out_png.with_name(a.out_png.stem + "_trace.png")
    decision_heatmap({**st, "trace": timed}, trace_png)
    record = {"model": j.name, "model_title": j.title, "images": n, "steps": a.steps, "repeats": a.repeats,
              "guidance_scale": a.guidance, "scheduler": a.scheduler,
              "options": FastCacheConfig.from_options(opts).to_dict(), "results": rows,
              "per_block_approx_ratio": st["per_block"], "torch": torch.__version__,
              "png": str(a.out_png), "trace_png": str(trace_png)}
    a.out_json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {a.out_png}, {trace_png} and {a.out_json}")
    return 0


def _print_table(rows: dict) -> None:
    cols = ["seconds_per_image", "speedup", "block_approx_ratio", "psnr_db", "ssim", "class_accuracy", "digits_fid"]
    cols += [c for c in ("temporal_psnr_db",) if c in rows["inductor"]]
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")


def _save_png(path: Path, base, fc, labels, rows, frames: int = 1) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = base.shape[-1]  # image side: 8 (DiT), 16 (MMDiT), 12 (Wan)
    w = s * frames  # a clip's frames side by side in its cell

    def grid(x):  # one column per class, one row per seed
        nc = len(torch.unique(labels))
        x = x[:, 0] if frames == 1 else x[:, 0].permute(0, 2, 1, 3).reshape(len(x), s, w)
        x = x.reshape(nc, -1, s, w).permute(1, 2, 0, 3).reshape(-1, nc * w)
        return x.numpy()

    diff = (fc - base).abs()
    # clips are wide (frames side by side): the three panels one above the other
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2)) if frames == 1 else plt.subplots(3, 1, figsize=(12, 6.5))
    r = rows["fastcache"]
    titles = ["plain torch.compile", f"fastcache ({r['speedup']:.2f}x, approx {r['block_approx_ratio']:.0%})",
              f"|difference| (PSNR {r['psnr_db']:.1f} dB)"]
    for ax, img, title, cmap, vmax in zip(axes, [grid(base), grid(fc), grid(diff)], titles,
                                          ["gray", "gray", "magma"], [1, 1, None]):
        im = ax.imshow(img, cmap=cmap, vmin=-1 if vmax == 1 else 0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([w * i + (w - 1) / 2 for i in range(len(torch.unique(labels)))], [str(int(c)) for c in torch.unique(labels)])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
