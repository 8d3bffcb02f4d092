"""The export folder's ``manifest.json``: what ``export`` writes and ``load_exported`` checks (format
and versions, inputs, the graph contract's state, controls, weights and extra outputs, artifact
sha256s)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fastcache_fx.export"
MANIFEST_VERSION = 1
FORMATS = ("aotinductor", "tensorrt")
WEIGHTS_FILE = "weights.safetensors"
PACKAGE_FILE = "model.pt2"
PROGRAM_FILE = "program.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"manifest: unknown dtype {name!r}")
    return dt


def _json_fill(x: float):
    return x if math.isfinite(x) else repr(float(x))  # JSON has no inf: "-inf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    import diffusers

    from .._version import __version__

    return {"fastcache_fx": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def write_manifest(out_dir: Path, *, format: str, engine: str, transformer, device, config, approx: str, layout,
                   captured, files: list[str]) -> Path:
    """Write ``out_dir/manifest.json`` atomically; returns its path."""
    manifest = {
        "format_id": MANIFEST_FORMAT,
        "manifest_version": MANIFEST_VERSION,
        "format": format,
        "engine": engine,
        "versions": _versions(),
        "model_class": type(getattr(transformer, "_orig_mod", transformer)).__name__,
        "device": str(device),
        "config": config.to_dict(),
        "approx": approx,
        "blocks": list(layout.blocks),
        "thresholds": list(layout.thresholds),
        "left_alone": [list(x) for x in layout.left_alone],
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": dtype_name(v.dtype)} for k, v in captured.inputs.items()],
        "static_kwargs": captured.static_kwargs,
        "outputs": captured.outputs,
        "num_graph_outputs": layout.num_user_outputs,
        "state": [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "fill": _json_fill(s.fill)}
                  for s in layout.state],
        "controls": [{"name": s.name, "shape": list(s.shape), "dtype": dtype_name(s.dtype), "fill": _json_fill(s.fill)}
                     for s in layout.controls],
        "weights": [{"name": s.name, "block": s.block, "stream": s.stream, "kind": s.key,
                     "shape": list(s.shape)} for s in layout.weights],
        "outputs_extra": [list(o) for o in layout.contract.outputs],
        "files": {f: sha256(out_dir / f) for f in files},
    }
    path = out_dir / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path
