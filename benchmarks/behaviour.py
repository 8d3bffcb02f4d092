"""Record the library's outputs before a refactor and check them after: ``record`` / ``check``.

    python benchmarks/behaviour.py record /tmp/before.pt
    python benchmarks/behaviour.py check /tmp/before.pt      # exit 1 on any difference

What is recorded (CPU, tiny random models, fixed seeds): the outputs and decisions of a 20-step
trajectory (``zoo_classes.trajectory``) of several diffusers classes under several option sets
(whole graph and regional), the DiT's token merge, token selection, dynamic shapes and online
calibration, a calibrated ``residual_linear`` run, and an exported AOTInductor package's outputs.
A refactor that keeps behaviour keeps these bit-identical (``check`` prints the largest
difference per case; a documented Inductor reordering may differ by <= 1e-6).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

import fastcache_fx as fc
from fastcache_fx import zoo_classes as Z

CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
           "SanaTransformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel",
           "HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel")
DIT = "DiTTransformer2DModel"
OPTIONS = {
    "error": {"error_budget": 0.5},
    "chi2": {"decision": "chi2", "cache_ratio_threshold": 0.5},
    "taylor": {"approx": "taylor", "error_budget": 0.5},
}
STEPS = 20


def _run(model, name: str, steps: int = STEPS, batch: int = 1) -> dict:
    outs = [Z.output_tensor(model(**kw)).detach().clone() for kw in Z.trajectory(name, steps, batch=batch)]
    s = fc.stats(model)
    return {"out": torch.stack(outs), "approx": torch.tensor([sum(r["approx"]) for r in s["trace"]])}


def _case(name: str, **options) -> dict:
    torch._dynamo.reset()
    model = Z.build(name)[0]
    regional = options.pop("regional", False)
    compiled = fc.enable_fastcache(copy.deepcopy(model), regional=regional, **options)
    return _run(compiled, name)


def _dit_cases(out: dict) -> dict:
    base = {"decision": "chi2", "cache_ratio_threshold": 0.5}
    for label, opts in {
        "token_merge": dict(base, enable_token_merge=True),
        "token_select": dict(base, enable_spatial_approx=True),
        "online": dict(base, approx="residual_linear", calibration="online", refit_every=4),
    }.items():
        out[f"DiT/{label}"] = _case(DIT, **opts)
    # dynamic shapes: two batch sizes through one compiled model
    torch._dynamo.reset()
    model = fc.enable_fastcache(Z.build(DIT)[0], dynamic=True, error_budget=0.5)
    out["DiT/dynamic"] = {f"b{b}": _run(model, DIT, steps=8, batch=b)["out"] for b in (1, 2)}
    # a calibration file (residual_linear)
    torch._dynamo.reset()
    model = Z.build(DIT)[0]
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "cal.safetensors")
        fc.calibrate(model, lambda m: [m(**kw) for kw in Z.trajectory(DIT, 6)], out=path, kind="residual_linear")
        out["DiT/calibrated"] = _case(DIT, approx="residual_linear", calibration=path, error_budget=0.5)
        # the exported AOTInductor package
        torch._dynamo.reset()
        kws = Z.trajectory(DIT, 10)
        fc.export(Z.build(DIT)[0], kws[0], Path(d) / "aoti", config={"decision": "chi2", "cache_ratio_threshold": 0.5})
        loaded = fc.load_exported(Path(d) / "aoti")
        out["DiT/aoti"] = {"out": torch.stack([Z.output_tensor(loaded(**kw)).clone() for kw in kws])}
    return out


def _guarded(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``; an exception is recorded as its message (it must recur the same way)."""
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001  (recorded, compared)
        out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    print(key, "error" if "error" in out[key] else "ok", flush=True)


def record() -> dict:
    out: dict = {}
    for name in CLASSES:
        for label, opts in OPTIONS.items():
            _guarded(out, f"{name}/{label}", lambda: _case(name, **opts))
        _guarded(out, f"{name}/regional", lambda: _case(name, regional=True, error_budget=0.5))
    _guarded(out, "DiT", lambda: _dit_cases({}))
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    res = {}
    for k, v in d.items():
        if isinstance(v, dict):
            res.update(_flat(v, f"{prefix}{k}/"))
        else:
            res[prefix + k] = v
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("record", "check"))
    p.add_argument("path", type=Path)
    a = p.parse_args(argv)
    now = _flat(record())
    if a.action == "record":
        torch.save(now, a.path)
        print(f"recorded {len(now)} tensors to {a.path}")
        return 0
    before = _flat(torch.load(a.path))
    bad = 0
    for k in sorted(set(before) | set(now)):
        if k not in before or k not in now:
            print(f"{k}: only in {'before' if k in before else 'now'}")
            bad += 1
            continue
        x, y = before[k], now[k]
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            print(f"{k}: {'same' if x == y else 'differs'}: {x!r} / {y!r}")
            bad += x != y
            continue
        same = x.shape == y.shape and torch.equal(x, y)
        diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else float("inf")
        print(f"{k}: {'identical' if same else f'max |diff| {diff:.3g}'}")
        bad += not same and not diff <= 1e-6
    print("OK" if not bad else f"{bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
