"""Predicted against measured output error of ``decision="output"`` (issue: the quality knob).

For each model and budget, samples with fastcache and, at every transformer call, runs an eager
copy of the same transformer on the same inputs: the measured relative output error of the step
is max over samples ||O_fastcache - O|| / ||O|| (the definition the rule predicts,
``ops.output_error``), the predicted one is ``stats()["trace"][i]["output_error"]``. Prints a
table per model and budget (PSNR of the final images against plain Inductor's, approximated
share, how often the measurement exceeded the prediction, median measured / predicted) and writes
``output_error.json`` and ``output_error.png`` (scatter, one panel per model).

    python benchmarks/output_error.py --models dit mmdit dit_unseen dit_random --budgets 0.05 0.1 0.2

(``dit_random``: the reference DiT's architecture with random weights.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import torch

import fastcache_fx
from fastcache_fx.reference.jobs import job
from fastcache_fx.reference.metrics import psnr_db

HERE = Path(__file__).resolve().parent


class Recorder(torch.nn.Module):
    """Stands in for a pipeline's transformer: calls the fastcache-compiled one, then the eager
    copy on the same inputs, and records the step's measured relative output error."""

    def __init__(self, compiled, eager) -> None:
        super().__init__()
        self.inner = compiled
        self.eager = eager
        self.measured: list[float] = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        ref = self.eager(*args, **kwargs)
        o = (out[0] if isinstance(out, tuple) else getattr(out, "sample", out)).float()
        r = (ref[0] if isinstance(ref, tuple) else getattr(ref, "sample", ref)).float()
        e = ((o - r).pow(2).flatten(1).sum(1) / r.pow(2).flatten(1).sum(1)).max().sqrt()
        self.measured.append(float(e))
        return out


def _random_dit():
    """The reference DiT's architecture with random weights (seed 0): a model nothing was trained on."""
    from fastcache_fx.reference.model import build_dit

    torch.manual_seed(0)
    return build_dit().eval().requires_grad_(False)


def get_job(name: str):
    """``jobs.job(name)``, or "dit_random": the DiT job with ``_random_dit`` weights."""
    import dataclasses

    if name == "dit_random":
        return dataclasses.replace(job("dit"), name=name, title="reference DiT architecture, random weights",
                                   _load=_random_dit)
    return job(name)


def run_model(name: str, budgets: list[float], samples: int, steps: int | None) -> dict:
    j = get_job(name)
    labels = [i % 10 for i in range(samples)]
    torch._dynamo.reset()
    base = j.sample(j.inductor(j.load()), labels, steps=steps)
    rows = []
    for b in budgets:
        torch._dynamo.reset()  # one compile per row: Dynamo's recompile limit would otherwise run later rows eager
        eager = j.load()
        fc = j.fastcache(j.load(), {"decision": "output", "error_budget": b})
        transformer = fc.transformer if j.pipeline else fc
        rec = Recorder(transformer, eager)
        if j.pipeline:
            fc.transformer = rec
        x = j.sample(fc if j.pipeline else rec, labels, steps=steps)
        st = fastcache_fx.stats(transformer)
        predicted = [t.get("output_error", float("nan")) for t in st["trace"]]
        pairs = [(p, m) for p, m in zip(predicted, rec.measured) if p > 0]
        over = sum(m > p for p, m in pairs) / len(pairs) if pairs else 0.0
        ratios = sorted(m / p for p, m in pairs)
        rows.append({"error_budget": b, "psnr_db": psnr_db(x, base), "block_approx_ratio": st["block_approx_ratio"],
                     "predicted": predicted, "measured": rec.measured, "steps_with_approx": len(pairs),
                     "share_measured_above_predicted": over,
                     "median_measured_over_predicted": ratios[len(ratios) // 2] if ratios else None})
        r = rows[-1]
        print(f"{name:10s} budget {b:<6} PSNR {r['psnr_db']:6.2f} dB  approx {r['block_approx_ratio']:.2f}  "
              f"steps with approx {len(pairs):3d}  measured > predicted {over:.2f}  "
              f"median measured/predicted {r['median_measured_over_predicted']}", flush=True)
    return {"model": name, "title": j.title, "samples": samples, "steps": steps or j.steps, "rows": rows}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        top = 1e-6
        for r in res["rows"]:
            pts = [(p, m) for p, m in zip(r["predicted"], r["measured"]) if p > 0]
            if pts:
                ax.scatter(*zip(*pts), s=10, label=f"budget {r['error_budget']}")
                top = max(top, max(max(p) for p in pts))
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="measured = predicted")
        ax.set_title(res["model"])
        ax.set_xlabel("predicted step output error")
        ax.set_ylabel("measured (eager recomputation)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["dit", "mmdit", "dit_unseen"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", type=Path, default=HERE / "output_error.json")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    results = [run_model(m, a.budgets, a.samples, a.steps) for m in a.models]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "commit": commit, "results": results}
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    plot(results, a.out.with_suffix(".png"))
    print(f"wrote {a.out} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
