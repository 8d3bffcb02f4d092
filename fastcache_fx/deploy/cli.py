"""``fastcache-fx export``: write a deployable cached transformer (AOTInductor or TensorRT).

    fastcache-fx export --model reference --out exported/ [--format aotinductor] [--batch 4]
    fastcache-fx export --model dit --size xl --format tensorrt --device cuda --out dit_trt/

The model is the bundled reference DiT (inputs: batched-CFG shapes [batch, 1, 8, 8]) or a zoo
family (``fastcache_fx.zoo``, random weights, for benchmarks). Load the folder with
``fastcache_fx.load_exported(out)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

MODELS = ("reference", "dit", "pixart", "sd3", "flux", "sana")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="reference", choices=MODELS, help="model to export (default: reference)")
    p.add_argument("--size", default="tiny", choices=("tiny", "xl"), help="zoo model size (not for reference)")
    p.add_argument("--format", default="aotinductor", choices=("aotinductor", "tensorrt"))
    p.add_argument("--batch", type=int, default=4, help="batch size fixed in the export (reference: 2 x images for CFG)")
    p.add_argument("--device", default="cpu", help="device to trace and compile on (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--threshold", type=float, default=None, help="cache_ratio_threshold (default: FastCacheConfig's)")
    p.add_argument("--config", type=Path, default=None, help="JSON file of FastCacheConfig fields")
    p.add_argument("--out", type=Path, required=True, help="output folder")


def example_inputs(model_name: str, size: str, batch: int, device: str, dtype: torch.dtype):
    """(model, example kwargs) for the CLI and ``benchmarks/gpu_check.py``.

    Raises:
        ValueError: batch < 1, or size other than tiny for the reference model.
    """
    if batch < 1:
        raise ValueError("--batch: must be >= 1")
    if model_name == "reference":
        if size != "tiny":
            raise ValueError("--size: the reference model has one size")
        from .. import reference

        model = reference.load()
        kw = dict(hidden_states=torch.randn(batch, 1, 8, 8), timestep=torch.full((batch,), 999, dtype=torch.long),
                  class_labels=torch.arange(batch) % 11)
    else:
        from .. import zoo

        model, kw = zoo.build(model_name, size, batch=batch)
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    kw = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() and k != "timestep" else v.to(device))
          for k, v in kw.items()}
    return model, kw


def run(args) -> int:
    """Export and print the manifest's summary; exit status 2 on a missing CUDA/TensorRT."""
    from ..config import FastCacheConfig
    from .export import export

    options = json.loads(args.config.read_text()) if args.config else {}
    if args.threshold is not None:
        options["cache_ratio_threshold"] = args.threshold
    config = FastCacheConfig.from_options(options)
    model, kw = example_inputs(args.model, args.size, args.batch, args.device, getattr(torch, args.dtype))
    try:
        path = export(model, kw, args.out, format=args.format, config=config)
    except RuntimeError as e:
        if "needs" in str(e):  # what is missing: CUDA, torch_tensorrt
            print(f"fastcache-fx export: error: {e}")
            return 2
        raise
    m = json.loads(path.read_text())
    print(f"{m['format']} export of {m['model_class']} ({len(m['blocks'])} blocks, approx={m['approx']}) -> {args.out}")
    for i in m["inputs"]:
        print(f"  input {i['name']}: {i['shape']} {i['dtype']}")
    print(f"  files: {', '.join(sorted(m['files']))}")
    return 0
