"""Spans chosen from measured errors against spans of equal depth (issue 23).

One block-level trajectory under the default rule measures every block's expected error e_l =
k_l x median(delta_l) (``fastcache_fx.choose_spans``, ``runtime/span_choice.py``); then the span level
with those depths and with ``--num-spans`` spans of equal depth run as rows of ``compare.py``'s
harness (same samples, seeds, timing and PSNR against Inductor), beside Inductor, in one run.

    python benchmarks/span_choice.py [--model dit] [--samples 40] [--num-spans 2] [--budgets 0.25,0.5,1.0]

Writes benchmarks/span_choice.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measured_sizes(suite, num_spans: int) -> tuple[tuple[int, ...], dict]:
    """(span depths, {block: e_l}) from one block-level trajectory of ``suite``'s samples."""
    import fastcache_fx
    from fastcache_fx.runtime.span_choice import block_errors

    torch._dynamo.reset()
    model = suite.job.load()
    suite.sample(suite.job.fastcache(model, {}), progress=False)
    return fastcache_fx.choose_spans(model, num_spans=num_spans), block_errors(model)


def main(argv=None) -> None:
    import compare

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="dit", choices=sorted(compare.MODELS))
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--num-spans", type=int, default=2)
    p.add_argument("--budgets", default="0.25,0.5,1.0")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "span_choice.json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    j = compare.job(a.model)
    ns = SimpleNamespace(model=a.model, samples=a.samples, steps=j.steps, guidance=j.guidance, no_progress=True,
                         repeats=a.repeats, peer_mode="compiled")
    suite = compare.Suite1(ns)
    sizes, errors = measured_sizes(suite, a.num_spans)
    print(f"e_l per block: { {b: round(e, 5) for b, e in errors.items()} } -> span_sizes {sizes}", flush=True)
    compare.FASTCACHE_VARIANTS["fastcache_span_chosen"] = {"decision": "output", "cache_level": "span",
                                                           "span_sizes": sizes}
    compare.FASTCACHE_VARIANTS["fastcache_span_equal"] = {"decision": "output", "cache_level": "span",
                                                          "num_spans": a.num_spans}
    compare.FASTCACHE_LABELS["fastcache_span_chosen"] = f"fastcache span level, span_sizes={sizes} (measured)"
    compare.FASTCACHE_LABELS["fastcache_span_equal"] = f"fastcache span level, {a.num_spans} spans of equal depth"
    rows = [suite.run_row({"method": "inductor", "param": None, "value": None})]
    for b in (float(x) for x in a.budgets.split(",")):
        for m in ("fastcache_span_equal", "fastcache_span_chosen"):
            rows.append(suite.run_row({"method": m, "param": "error_budget", "value": b}))
    print("\n| spans | budget | speedup | PSNR (dB) | approx. ratio |\n|---|---|---|---|---|")
    for r in rows[1:]:
        kind = f"chosen {sizes}" if r["method"].endswith("chosen") else f"equal ({a.num_spans})"
        if r["status"] != "ok":
            print(f"| {kind} | {r['value']} | {r['status']}: {r.get('reason', '')} | | |")
            continue
        print(f"| {kind} | {r['value']} | {r['speedup']:.2f}x | {r['psnr_db']:.1f} | {r['approx_ratio']:.2f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    for r in rows:
        r.pop("trace", None)
    a.out.write_text(json.dumps({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                                 "commit": commit, "command": "python benchmarks/span_choice.py " + " ".join(argv or sys.argv[1:]),
                                 "sizes": list(sizes), "block_errors": errors, "rows": rows}, indent=1, default=str))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
