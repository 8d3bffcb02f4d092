"""One-shot GPU check (issue 39): everything the first lent GPU run must tell, in one command that
cannot waste the run. docs/torch-and-gpu.md explains it; the command on a lent machine
(torch 2.11.0+cu130, Python 3.12, no diffusers) after `bash benchmarks/gpu_wheels.sh` here:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py

(the device tool's ``carry: [".whl"]``, ``timeout_s: 600``). Elsewhere:
``python benchmarks/gpu_check.py [--out DIR]``; ``--device cpu --smoke`` checks the plumbing on CPU
with tiny configurations (tests/test_gpu_check.py, second tier: about 8 Inductor compiles, minutes
on 2 cores, not the one minute first aimed at); ``--record-reference`` rewrites the CPU trace.

Every row is appended to ``$OUT/gpu_check.jsonl`` (or ``--out DIR``) the moment it is measured;
an internal deadline (``--deadline``, 470 s) skips what no longer fits, one row each; an error is
one row with the last lines of its traceback. Sections, in order:

1. ``preflight``: Python, torch, CUDA, GPU, diffusers, triton, torch-tensorrt, the private torch
   internals this torch lacks (``fastcache_fx.torch_compat.probe``), what is missing.
2. ``correctness``: the bundled trained DiT (``fastcache_fx.reference``) sampled on the device
   with the default options (DDIM, batched CFG), against the trace recorded on CPU
   (``benchmarks/gpu_reference_trace.json``): the decisions of every step and block (mismatches,
   those within 1 % of the threshold counted apart as numerics), PSNR of the device's samples
   against the CPU's cached and uncached samples.
3. ``flux``: real-size FLUX.1-dev blocks in bf16 (``gpu_check_flux``): plain Inductor, the
   rewrite's own overhead (decisions forced all-full), all-approximated, host syncs per step,
   the step level, the CUDA-graph step lowering where this checkout has it, diffusers'
   FirstBlockCache on the same inputs, peak memory, state bytes; TensorRT rows skipped in one
   line without torch-tensorrt.
4. ``aotinductor``: the bundled DiT exported as an AOTInductor package: size, build and load
   seconds, the same decisions and samples as the in-process run of section 2.
5. ``quantized``: the bundled DiT with torchao weight-only int8, dynamic float8 and weight-only
   int4 (``gpu_check_quant``): equal to plain Inductor with the approximation off, cached under
   the defaults, no fallback; skipped in one row without torchao (``--smoke``: int8 only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's fastcache_fx (the lent machine has no install of it)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_check_rows import Rows, short_error  # noqa: E402

REFERENCE = ROOT / "benchmarks" / "gpu_reference_trace.json"
#: decision mismatches with |delta - threshold| <= NEAR * threshold (on CPU) count as numerics
NEAR = 0.01
#: the sampling runs of the correctness section: (labels, steps); "smoke" for --smoke
RUNS = {"full": (list(range(8)), 50), "smoke": ([0, 1], 8)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                   help="folder of gpu_check.jsonl (default $OUT, else ./gpu_check_out)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny configurations: checks the plumbing, not the GPU")
    p.add_argument("--deadline", type=float, default=470.0, help="internal deadline in seconds (default 470)")
    p.add_argument("--steps", type=int, default=11, help="FLUX trajectory: 1 untimed + steps-1 timed (default 11)")
    p.add_argument("--repeats", type=int, default=3, help="timed trajectories per FLUX variant (default 3)")
    p.add_argument("--flux-double", type=int, default=2, help="joint blocks of the FLUX model (default 2)")
    p.add_argument("--flux-single", type=int, default=4, help="single blocks (default 4 = 2 x double)")
    p.add_argument("--compile-estimate-s", type=float, default=60.0,
                   help="seconds one real-size compile is assumed to take, for the deadline (default 60)")
    p.add_argument("--sections", default="preflight,correctness,flux,aotinductor,quantized")
    p.add_argument("--record-reference", action="store_true",
                   help="record benchmarks/gpu_reference_trace.json on this machine's CPU and exit")
    args = p.parse_args(argv)
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be >= 2 and --repeats >= 1")
    if args.smoke:
        args.steps, args.repeats = min(args.steps, 4), min(args.repeats, 2)
        args.flux_double, args.flux_single, args.compile_estimate_s = 1, 2, min(args.compile_estimate_s, 5.0)
    return args


# section 1 --------------------------------------------------------------------------------------

def preflight(rows: Rows, device: torch.device) -> list[str]:
    """One row of versions and what is missing; returns the missing packages."""
    import importlib.util

    from fastcache_fx import __version__, torch_compat

    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    missing = [n for n in ("diffusers", "scipy", "safetensors", "sklearn") if importlib.util.find_spec(n) is None]
    row = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "fastcache_fx": __version__, "commit": _commit(), "device": str(device),
           "torch_in_supported_range": torch_compat.in_supported_range(),
           "torch_internals_missing": [k for k, ok in torch_compat.probe().items() if not ok],
           "diffusers": version("diffusers"), "triton": version("triton"),
           "torch_tensorrt": version("torch-tensorrt") or version("torch_tensorrt"), "missing": missing}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        row.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 1e9, 1), sm=f"{p.major}.{p.minor}",
                   gpus=torch.cuda.device_count())
    rows.write(**row)
    return missing


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or os.environ.get("FASTCACHE_COMMIT", "unknown")


# section 2 --------------------------------------------------------------------------------------

class OnDevice:
    """The sampler-facing callable of a model on ``device``: inputs moved there, ``.sample`` back on
    the CPU in float32 (the sampler and its scheduler stay on the CPU, as in the recorded trace)."""

    def __init__(self, fn, device: torch.device) -> None:
        self.fn, self.device = fn, device

    def __call__(self, hidden_states, timestep, class_labels):
        out = self.fn(hidden_states=hidden_states.to(self.device), timestep=timestep.to(self.device),
                      class_labels=class_labels.to(self.device))
        out = getattr(out, "sample", out)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return _Out(out.float().cpu())


class _Out:
    def __init__(self, sample):
        self.sample = sample


def sample_run(model_fn, run: str, device: torch.device):
    """Samples [B, 1, 8, 8] of the bundled DiT for RUNS[run] (labels, steps; seeds 0..B-1)."""
    from fastcache_fx.reference.jobs import job

    labels, steps = RUNS[run]
    return job("dit").sample(OnDevice(model_fn, device), labels, steps=steps, seeds=0)


def decisions_of(trace: list[dict]) -> dict:
    return {"approx": [t["approx"] for t in trace], "delta": [t["delta"] for t in trace],
            "threshold": [t["threshold"] for t in trace]}


def cached_run(run: str, device: torch.device):
    """(samples, decisions, the compiled model) of the bundled DiT under fastcache's defaults."""
    import fastcache_fx
    from fastcache_fx.reference.jobs import job

    model = job("dit").load().to(device)
    torch.compiler.reset()
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(), dynamic=False)
    fastcache_fx.reset(model)
    x = sample_run(compiled, run, device)
    # the whole trace since reset(): read after the run (never slice a trace that reset() cleared)
    return x, decisions_of(fastcache_fx.stats(model)["trace"]), model


def record_reference() -> int:
    """Record the CPU trace of both runs into REFERENCE."""
    import fastcache_fx
    from fastcache_fx.reference.jobs import job
    from fastcache_fx.reference.metrics import psnr_db

    cpu = torch.device("cpu")
    data = {"torch": torch.__version__, "commit": _commit(),
            "what": "bundled DiT, fastcache defaults, reference.jobs.job('dit').sample, seeds 0..B-1, on CPU",
            "runs": {}}
    for run, (labels, steps) in RUNS.items():
        x, dec, _ = cached_run(run, cpu)
        eager = sample_run(job("dit").load(), run, cpu)
        data["runs"][run] = {"labels": labels, "steps": steps, **dec, "samples": _round(x), "eager": _round(eager),
                             "psnr_vs_eager_db": round(psnr_db(x, eager), 3),
                             "block_approx_ratio": _ratio(dec["approx"])}
    data["options"] = dataclasses.asdict(fastcache_fx.FastCacheConfig())
    REFERENCE.write_text(json.dumps(data, default=str) + "\n")
    print(f"wrote {REFERENCE.relative_to(ROOT)}: " + ", ".join(
        f"{r}: approx {v['block_approx_ratio']}, {v['psnr_vs_eager_db']} dB vs eager" for r, v in data["runs"].items()))
    return 0


def _round(x: torch.Tensor) -> list:
    return [[round(v, 6) for v in s.flatten().tolist()] for s in x]


def _ratio(approx: list[list[bool]]) -> float:
    return round(sum(map(sum, approx)) / max(1, sum(map(len, approx))), 4)


def compare_decisions(got: dict, ref: dict) -> dict:
    """Step-by-step comparison of every decision with the reference (all steps, all blocks)."""
    mism, near, first = 0, 0, None
    n = min(len(got["approx"]), len(ref["approx"]))
    for s in range(n):
        for b, (a, r) in enumerate(zip(got["approx"][s], ref["approx"][s])):
            if a != r:
                d, t = ref["delta"][s][b], ref["threshold"][s][b]
                if abs(d - t) <= NEAR * abs(t):
                    near += 1
                else:
                    mism += 1
                first = s if first is None else first
    return {"steps_compared": n, "steps_ref": len(ref["approx"]), "decisions_equal": mism == near == 0
            and len(got["approx"]) == len(ref["approx"]), "mismatches": mism, "mismatches_near_threshold": near,
            "first_mismatch_step": first, "block_approx_ratio": _ratio(got["approx"]),
            "block_approx_ratio_ref": _ratio(ref["approx"])}


def correctness(rows: Rows, device: torch.device, run: str, keep: dict) -> None:
    from fastcache_fx.reference.jobs import job
    from fastcache_fx.reference.metrics import psnr_db

    ref = json.loads(REFERENCE.read_text())["runs"][run]
    shape = (len(ref["labels"]), 1, 8, 8)
    ref_x = torch.tensor(ref["samples"]).reshape(shape)
    ref_eager = torch.tensor(ref["eager"]).reshape(shape)
    t0 = time.perf_counter()
    x, dec, model = cached_run(run, device)
    keep.update(model=model, samples=x, decisions=dec)
    row = {"model": "reference DiT", "run": run, "steps": ref["steps"], "samples": shape[0],
           "seconds": round(time.perf_counter() - t0, 1), **compare_decisions(dec, ref),
           "psnr_vs_cpu_cached_db": round(psnr_db(x, ref_x), 2),
           "psnr_vs_cpu_eager_db": round(psnr_db(x, ref_eager), 2),
           "cpu_psnr_vs_eager_db": ref["psnr_vs_eager_db"]}
    eager = sample_run(job("dit").load().to(device), run, device)
    row["eager_psnr_vs_cpu_eager_db"] = round(psnr_db(eager, ref_eager), 2)  # the device's own numerics
    rows.write(**row)


# section 4 --------------------------------------------------------------------------------------

def aotinductor(rows: Rows, device: torch.device, run: str, keep: dict) -> None:
    import fastcache_fx
    from fastcache_fx.reference.jobs import job
    from fastcache_fx.reference.metrics import psnr_db

    labels, _ = RUNS[run]
    b = 2 * len(labels)  # batched CFG
    model = job("dit").load().to(device)
    kw = dict(hidden_states=torch.randn(b, 1, 8, 8, device=device),
              timestep=torch.full((b,), 999, dtype=torch.long, device=device),
              class_labels=torch.arange(b, device=device) % 10)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        fastcache_fx.export(model, kw, d, format="aotinductor")
        build = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        loaded = fastcache_fx.load_exported(d)
        load = time.perf_counter() - t0
        loaded.reset()
        x = sample_run(loaded, run, device)
        dec = decisions_of(loaded.stats()["trace"])
    row = {"model": "reference DiT", "run": run, "package_mb": round(size / 1e6, 2), "build_s": round(build, 1),
           "load_s": round(load, 2)}
    if "decisions" in keep:
        cmp = compare_decisions(dec, keep["decisions"])
        row.update(same_decisions_as_in_process=cmp["decisions_equal"], mismatches=cmp["mismatches"],
                   mismatches_near_threshold=cmp["mismatches_near_threshold"],
                   psnr_vs_in_process_db=round(psnr_db(x, keep["samples"]), 2))
    row["block_approx_ratio"] = _ratio(dec["approx"])
    rows.write(**row)


# the run ----------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    if args.record_reference:
        return record_reference()
    rows = Rows(args.out, args.deadline)
    device = torch.device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    rows.section = "preflight"
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = ("no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine, or "
               "`--device cpu --smoke` for the plumbing")
        rows.write(status="error", error=msg)
        print(f"gpu_check: {msg}", file=sys.stderr)
        return 2
    try:
        missing = preflight(rows, device)
    except Exception as e:
        rows.write(status="error", error=short_error(e))
        return 1
    if "diffusers" in missing:
        rows.write(status="error", error="diffusers is missing: carry its wheels (benchmarks/gpu_wheels.sh) "
                   "and install them first (docs/torch-and-gpu.md)")
        return 1
    run = "smoke" if args.smoke else "full"
    keep: dict = {}
    est = args.compile_estimate_s
    if "correctness" in sections:
        rows.run("correctness", lambda: correctness(rows, device, run, keep), need_s=est * 0.5)
    if "flux" in sections:
        from gpu_check_flux import run_flux

        rows.run("flux", lambda: run_flux(rows, args, device), need_s=est * 2)
    if "aotinductor" in sections:
        rows.run("aotinductor", lambda: aotinductor(rows, device, run, keep), need_s=est * 1.5)
    if "quantized" in sections:
        from gpu_check_quant import quantized

        rows.run("quantized", lambda: quantized(rows, device, args.smoke), need_s=est * 1.5)
    rows.section = "end"
    errors = sum(1 for r in rows.rows if r.get("status") == "error")
    skipped = sum(1 for r in rows.rows if r.get("status") == "skipped")
    rows.write(status="done", rows=len(rows.rows), errors=errors, skipped=skipped, out=str(rows.path))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
