"""Section 5 of benchmarks/gpu_check.py: quantized weights (torchao) on the device.

The bundled trained DiT (``fastcache_fx.reference``), quantized with each torchao config this
torchao has (weight-only int8, dynamic float8, weight-only int4), over a 6-step trajectory of
batched-CFG calls: plain Inductor of the quantized model, then a bare
``torch.compile(backend="fastcache")`` with the approximation off (must equal plain Inductor:
relative error) and with the default options (cached without a fallback, share of block-steps
approximated, finite output). One row per config; a config this torchao or device cannot run is
one row with its error. Float8 needs a GPU of compute capability >= 8.9; int4 weight-only
needs CUDA (on CPU torchao packs int4 for its own CPU kernels only in bf16).
"""

from __future__ import annotations

import time

import torch

TIMESTEPS = (900, 800, 700, 600, 500, 400)


def _configs(smoke: bool) -> list[tuple[str, object]]:
    import torchao.quantization as Q

    out = [("int8_weight_only", lambda: Q.Int8WeightOnlyConfig())]
    if not smoke:
        out.append(("float8_dynamic", lambda: Q.Float8DynamicActivationFloat8WeightConfig()))
        out.append(("int4_weight_only", lambda: Q.Int4WeightOnlyConfig(group_size=32)))
    return out


def _run(model_fn, kw: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model_fn(kw["hidden_states"], timestep=torch.full_like(kw["timestep"], t),
                         class_labels=kw["class_labels"]).sample.float() for t in TIMESTEPS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def quantized(rows, device: torch.device, smoke: bool) -> None:
    """Write one row per torchao config (see the module docstring)."""
    try:
        import torchao  # noqa: F401
    except ImportError:
        rows.write(status="skipped", reason="torchao is not installed (carry its wheel: benchmarks/gpu_wheels.sh)")
        return
    import fastcache_fx
    from fastcache_fx.reference.jobs import job
    from torchao.quantization import quantize_

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name, make in _configs(smoke):
        t0 = time.perf_counter()
        try:
            model = job("dit").load().to(device=device, dtype=dtype).eval()
            quantize_(model, make())
            b = 16
            kw = dict(hidden_states=torch.randn(b, 1, 8, 8, device=device, dtype=dtype),
                      timestep=torch.full((b,), 999, dtype=torch.long, device=device),
                      class_labels=torch.arange(b, device=device) % 10)
            torch.compiler.reset()
            ref = _run(torch.compile(model), kw)
            torch.compiler.reset()
            off = torch.compile(model, backend="fastcache", options={"enable_block_approx": False})
            _run(off, kw)  # the first calls prepare the model (weights unwrapped) and trace it again
            fastcache_fx.reset(off)
            outs = _run(off, kw)
            st_off = fastcache_fx.stats(off)
            torch.compiler.reset()
            live = torch.compile(model, backend="fastcache")
            _run(live, kw)
            fastcache_fx.reset(live)
            got = _run(live, kw)
            st = fastcache_fx.stats(live)
            rows.write(config=name, dtype=str(dtype).replace("torch.", ""),
                       off_max_rel_err_vs_inductor=max(_rel(a, r) for a, r in zip(outs, ref)),
                       fallback=st_off["fallback"] + st["fallback"], block_approx_ratio=round(st["block_approx_ratio"], 3),
                       finite=all(bool(torch.isfinite(o).all()) for o in got),
                       seconds=round(time.perf_counter() - t0, 1))
        except Exception as e:  # a config this torchao or device cannot run: its row, then the next
            from gpu_check_rows import short_error

            rows.write(config=name, status="error", error=short_error(e), seconds=round(time.perf_counter() - t0, 1))
