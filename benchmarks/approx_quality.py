"""Quality of the block approximations at the same approximated (block, step) pairs (issue #4).

    python benchmarks/approx_quality.py [--seeds 4] [--steps 50] [--calib-samples 40]
    python benchmarks/approx_quality.py --model mmdit --out-json benchmarks/approx_quality_mmdit.json \
        --out-png docs/approx_quality_mmdit.png

``--model mmdit`` runs the same on the bundled flow-matching MMDiT (SD3 joint blocks, 28 Euler steps
of the real ``StableDiffusion3Pipeline``): both streams of a joint block are approximated together
(one decision per block, as the graph does), each with its own map; errors are over both streams,
class accuracy / digits-FID use the 2x2-pooled 8x8 images.

1. Calibrate on the reference DiT (uncompiled, seeds disjoint from the evaluation seeds): the
   ridge statistics of ``linear`` and ``residual_linear`` are collected once each with 4 time
   buckets (``collect_stats``) and fitted for every variant (``fit_calibration``: rank, pooled
   buckets).
2. Record one decision trace: the evaluation grid (10 classes x ``--seeds``, batched CFG,
   ``--steps`` DDIM steps) sampled with ``backend="fastcache"`` and the default options
   (approx="residual"); ``fastcache_fx.stats(model)["trace"]`` gives approx[step, block].
3. Replay that trace for every variant on the eager model with forward hooks: at an
   approximated (block, step) the block is still computed (the true output Y, given the input
   H of *this* trajectory) and replaced by the approximation Yhat, exactly the tensor functions
   the graph calls (``ops.decision.approx_residual`` / ``approx_map``), with anchors updated
   at full computations as the runtime does. Recorded: ||Yhat - Y|| / ||Y|| and
   ||Yhat - Y|| / ||Y - H|| (error relative to the block's own contribution) per (step, block).
4. End to end: PSNR / SSIM of each variant's images against the baseline (no approximation),
   class accuracy and digits-FID with the bundled classifier; approximation cost as a fraction
   of a block's FLOPs (``torch.utils.flop_counter``; elementwise adds counted as 1 FLOP per
   element) and of its measured eager time.

Writes benchmarks/approx_quality.json, docs/approx_quality.png and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import platform
import subprocess
import time
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx import reference as R
from fastcache_fx.reference.jobs import MODELS, job
from fastcache_fx.ops import decision as D
from fastcache_fx.calibration import RidgeStats, _binder, block_modules, collect_stats, fit_calibration

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = 4

# name -> (kind, fitted kind or None, rank, time buckets, prior); prior "zero" = plain ridge
VARIANTS = {
    "residual": ("residual", None, None, 1, None),
    "linear (paper, W = I + C)": ("linear", "linear", None, 1, "identity"),
    "linear, prior W = 0": ("linear", "linear", None, 1, "zero"),
    "residual_linear": ("residual_linear", "residual_linear", None, 1, "identity"),
    "linear r=16": ("linear", "linear", 16, 1, "identity"),
    "linear r=64": ("linear", "linear", 64, 1, "identity"),
    "linear K=4": ("linear", "linear", None, 4, "identity"),
    "residual_linear K=4": ("residual_linear", "residual_linear", None, 4, "identity"),
}


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return "unknown"


def _maps(stats, rank, buckets, prior):
    """({block: [[tensors for approx_map] per canonical stream]}, calibration metadata or None)."""
    streams = {}
    for (block, s) in stats.shapes:
        streams[block] = max(streams.get(block, 0), s + 1)
    if prior == "zero":  # the plain ridge, shrunk toward W = 0 (all buckets pooled)
        pooled = {}
        for (block, s, k), st in stats.stats.items():
            pooled[(block, s)] = (pooled.get((block, s)) or RidgeStats(st.d_in, st.d_out)).merge(st)
        return {b: [list(pooled[(b, s)].fit()) for s in range(n)] for b, n in streams.items()}, None
    cal = fit_calibration(stats, rank=rank, time_buckets=buckets)
    keys = ("u", "v", "bias") if rank is not None else ("weight", "bias")
    return {b: [[cal.tensors[f"{b}.{k}.{s}"] for k in keys] for s in range(streams[b])] for b in stats.blocks}, \
        cal.metadata


def _streams(named: dict, output) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(output position, input H, output Y) of each stream of one block call, in the canonical
    order of ``calibration.stream_pairs`` (most tokens first): DiT blocks have one stream,
    SD3 joint blocks return (encoder_hidden_states, hidden_states), the last one (None, hidden_states)."""
    outs = list(output) if isinstance(output, (tuple, list)) else [output]
    found = []
    for p, o in enumerate(outs):
        if not isinstance(o, torch.Tensor) or o.dim() != 3:
            continue
        name = "hidden_states" if p == len(outs) - 1 else "encoder_hidden_states"
        found.append((p, name, named[name], o))
    found.sort(key=lambda t: (-t[3].shape[1], t[1] != "hidden_states"))
    return [(p, x, y) for p, _, x, y in found]


class Replay:
    """Forward hooks replaying approx[step, block] with one approximation variant."""

    def __init__(self, model, trace: torch.Tensor, kind: str, maps: dict | None, rank, buckets: int):
        self.model, self.trace, self.kind, self.maps, self.rank, self.buckets = model, trace, kind, maps, rank, buckets
        self.blocks = list(block_modules(model).items())
        self.step, self.t = -1, 0.0
        self.anchor_in, self.anchor_res = {}, {}
        self.err = torch.full(trace.shape, float("nan"))  # ||Yhat - Y|| / ||Y||
        self.err_res = torch.full(trace.shape, float("nan"))  # ||Yhat - Y|| / ||Y - H||
        self.handles = []
        self.binders = {name: _binder(blk) for name, blk in self.blocks}

    def __enter__(self):
        def pre(mod, args, kwargs):
            self.step += 1
            self.t = float(kwargs["timestep"].reshape(-1)[0])

        self.handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        for l, (name, blk) in enumerate(self.blocks):
            self.handles.append(blk.register_forward_hook(self._hook(l, name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, l, name):
        def fn(mod, args, kwargs, output):
            streams = _streams(self.binders[name](args, kwargs), output)
            i = self.step
            if i < self.trace.shape[0] and bool(self.trace[i, l]) and name in self.anchor_in:
                outs = list(output) if isinstance(output, (tuple, list)) else [output]
                e2 = y2 = r2 = 0.0
                for s, (p, h, y) in enumerate(streams):  # one decision, every stream approximated
                    if self.kind == "residual":
                        yhat = D.approx_residual(h, self.anchor_res[name][s])
                    else:
                        yhat = D.approx_map(h, self.anchor_res[name][s], self.anchor_in[name][s], self.maps[name][s],
                                            torch.tensor(self.t), None, kind=self.kind, rank=self.rank,
                                            buckets=self.buckets, timestep_max=1000.0)
                    e2 += float((yhat - y).norm()) ** 2
                    y2 += float(y.norm()) ** 2
                    r2 += float((y - h).norm()) ** 2
                    outs[p] = yhat
                self.err[i, l] = (e2 / y2) ** 0.5
                self.err_res[i, l] = (e2 / r2) ** 0.5
                return tuple(outs) if isinstance(output, (tuple, list)) else outs[0]
            self.anchor_in[name] = [h.detach().clone() for _, h, _ in streams]
            self.anchor_res[name] = [(y - h).detach().clone() for _, h, y in streams]
            return output
        return fn


def _costs(model, kw_block):
    """FLOPs and eager time of one block call vs each approximation (same [B, N, D] input)."""
    from torch.utils.flop_counter import FlopCounterMode

    name, blk = next(iter(block_modules(model).items()))
    h = kw_block["hidden_states"]
    n_el = h.numel()  # the image stream: an MMDiT's 4 class tokens add 6 % to the approximation cost
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        blk(**kw_block)
    block_flops = fc.get_total_flops() + 10 * n_el  # matmuls/attention + a rough 10 elementwise ops per element

    def timeit(fn, reps=30):
        with torch.no_grad():
            fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    d = h.shape[-1]
    w, b = torch.randn(d, d), torch.randn(d)
    t_block = timeit(lambda: blk(**kw_block))
    res = torch.randn_like(h)
    out = {}
    for vname, (kind, _, rank, buckets, _) in VARIANTS.items():
        if kind == "residual":
            flops, fn = n_el, (lambda: D.approx_residual(h, res))
        else:
            maps = [torch.randn(d, rank), torch.randn(d, rank), b] if rank else [w, b]
            maps = [m.expand((buckets,) + m.shape).contiguous() if buckets > 1 else m for m in maps]
            extra = 2 * n_el if kind == "residual_linear" else 0  # H - H_anchor, + R_anchor
            flops = (2 * n_el * (2 * rank) + 2 * n_el if rank else 2 * n_el * d + n_el) + extra
            fn = (lambda maps=maps, kind=kind, rank=rank, buckets=buckets:
                  D.approx_map(h, res, h, maps, torch.tensor(500.0), None, kind=kind, rank=rank, buckets=buckets,
                               timestep_max=1000.0))
        out[vname] = {"flops_fraction": flops / block_flops, "time_fraction": timeit(fn) / t_block}
    return out, block_flops, t_block


def _plot(errors: dict, blocks: list, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(errors)
    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(10, 1.15 * len(names) + 2.6), sharex=True)
    vmax = max(float(np.nanpercentile(np.asarray(e), 99)) for e in errors.values())
    for ax, n in zip(axes, names):
        im = ax.imshow(np.asarray(errors[n]).T, aspect="auto", cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(blocks)), [str(i) for i in range(len(blocks))], fontsize=6)
        ax.set_ylabel(n, rotation=0, ha="right", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[:-1], fraction=0.02, label="||Yhat - Y|| / ||Y - H||")
    ax = axes[-1]
    for n in names:
        e = np.asarray(errors[n], dtype=float)
        steps = np.where(np.isfinite(e).any(axis=1))[0]  # approximated steps only
        ax.plot(steps, np.nanmean(e[steps], axis=1), marker="o", ms=3, label=n, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean over\nblocks", fontsize=7)
    ax.legend(fontsize=5, ncol=2)
    fig.suptitle("block approximation error ||Yhat - Y|| / ||Y - H|| at the replayed (block, step) pairs "
                 "(rows: blocks; blank: computed fully)", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dit", choices=MODELS, help="bundled model (default dit)")
    p.add_argument("--seeds", type=int, default=4, help="evaluation samples per class (default 4)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: 50 DDIM dit, 28 flow mmdit)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p.add_argument("--calib-samples", type=int, default=40, help="calibration trajectories (default 40)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a loaded machine)")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "approx_quality.json")
    p.add_argument("--out-png", type=Path, default=ROOT / "docs" / "approx_quality.png")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    j = job(a.model)
    a.steps = a.steps or j.steps
    a.guidance = j.guidance if a.guidance is None else a.guidance
    model, clf = j.load().eval(), R.load_classifier()
    labels = torch.arange(10).repeat_interleave(a.seeds)
    seeds = [1000 + i for i in range(len(labels))]
    sample = lambda m: j.sample(m, labels, steps=a.steps, guidance=a.guidance, seeds=seeds)
    small = j.to_classifier

    t0 = time.perf_counter()
    calib_labels = torch.arange(a.calib_samples) % 10
    run_calib = lambda m: j.sample(m, calib_labels, steps=a.steps, guidance=a.guidance, seeds=0)
    stats = {k: collect_stats(model, run_calib, kind=k, time_buckets=BUCKETS) for k in ("linear", "residual_linear")}
    t_calib = time.perf_counter() - t0
    print(f"calibration: {a.calib_samples} trajectories x {a.steps} steps, {t_calib:.1f} s")

    # one decision trace from the real backend, default options
    torch._dynamo.reset()
    fc_model = j.load().eval()
    compiled = j.fastcache(fc_model)  # default options
    fc_imgs = sample(compiled)
    trace = torch.tensor([s["approx"] for s in fastcache_fx.stats(fc_model)["trace"]][-a.steps:])
    print(f"trace: {trace.shape[0]} steps x {trace.shape[1]} blocks, approx ratio {float(trace.float().mean()):.3f}")
    torch._dynamo.reset()

    base = sample(model)
    rows, errors, metas = {}, {}, {}
    blocks = list(block_modules(model))
    for vname, (kind, fitted, rank, buckets, prior) in VARIANTS.items():
        maps = None
        if fitted is not None:
            maps, metas[vname] = _maps(stats[fitted], rank, buckets, prior)
        with Replay(model, trace, kind, maps, rank, buckets) as rp:
            imgs = sample(model)
        errors[vname] = rp.err_res.tolist()
        m = trace.bool()
        rows[vname] = {
            "kind": kind, "rank": rank, "time_buckets": buckets, "prior": prior,
            "rel_error_output": float(rp.err[m].nanmean()), "rel_error_residual": float(rp.err_res[m].nanmean()),
            "rel_error_residual_per_block": [float(rp.err_res[:, l][m[:, l]].nanmean()) for l in range(len(blocks))],
            "psnr_db": float(R.psnr(imgs, base).clamp_max(100).mean()), "ssim": float(R.ssim(imgs, base).mean()),
            "class_accuracy": R.class_accuracy(clf, small(imgs), labels), "digits_fid": R.digits_fid(clf, small(imgs)),
        }
        print(f"{vname}: err/||Y|| {rows[vname]['rel_error_output']:.4f}, err/||Y-H|| "
              f"{rows[vname]['rel_error_residual']:.4f}, PSNR {rows[vname]['psnr_db']:.2f}")
    # the trace was recorded on the compiled residual run: the eager residual replay reproduces it
    replay_vs_compiled = float(R.psnr(fc_imgs, base).clamp_max(100).mean())

    b2 = 2 * len(labels)
    with torch.no_grad():
        width = model.config.num_attention_heads * model.config.attention_head_dim
        emb = {"hidden_states": torch.randn(b2, 64, width)}
        if a.model == "mmdit":  # a joint block: the class-token stream and the conditioning vector temb
            emb.update(encoder_hidden_states=torch.randn(b2, 4, width), temb=torch.randn(b2, width))
        else:  # the block's context inputs as the model passes them (AdaLN-zero: timestep and class labels)
            emb.update(timestep=torch.full((b2,), 500), class_labels=torch.arange(b2) % 10)
    costs, block_flops, t_block = _costs(model, emb)
    for k, c in costs.items():
        rows[k].update(c)
    baseline = {"class_accuracy": R.class_accuracy(clf, small(base), labels), "digits_fid": R.digits_fid(clf, small(base))}
    record = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": _git_commit(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "command": "python benchmarks/approx_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": a.model, "images": len(labels), "steps": a.steps, "guidance": a.guidance, "calib_samples": a.calib_samples,
        "approx_ratio": float(trace.float().mean()), "trace": trace.int().tolist(),
        "compiled_residual_psnr_db": replay_vs_compiled, "baseline": baseline,
        "block_flops": block_flops, "block_seconds": t_block, "results": rows,
        "error_map": {k: [[None if x != x else round(x, 5) for x in row] for row in v] for k, v in errors.items()},
        "fit_error": {k: (v or {}).get("fit_error") for k, v in metas.items()},
        "ridge": {k: (v or {}).get("ridge") for k, v in metas.items()},
    }
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(record, indent=1) + "\n")
    _plot(errors, blocks, a.out_png)
    cols = ["rel_error_output", "rel_error_residual", "psnr_db", "ssim", "class_accuracy", "digits_fid",
            "flops_fraction", "time_fraction"]
    print(f"\nbaseline: class accuracy {baseline['class_accuracy']:.3f}, digits-FID {baseline['digits_fid']:.1f}; "
          f"compiled residual run PSNR {replay_vs_compiled:.2f} dB")
    print("| variant | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for k, r in rows.items():
        print(f"| {k} | " + " | ".join(f"{r[c]:.4g}" for c in cols) + " |")
    print(f"wrote {a.out_json} and {a.out_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
