"""The calibration file: ``Calibration`` (safetensors maps + JSON metadata), ``save`` / ``load``, and
``load_calibration``, which maps a file's streams onto a graph's blocks (see the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ops.maps import weight_shapes

KINDS = ("linear", "residual_linear")
FORMAT = "fastcache_fx.calibration"
FORMAT_VERSION = 2


@dataclass
class Calibration:
    """Fitted maps and their metadata.

    tensors: "<block>.weight.<s>" [D_out, D_in] and "<block>.bias.<s>" [D_out] (or, with a
        rank, "<block>.u.<s>" [D_out, r], "<block>.v.<s>" [D_in, r] and the bias; a leading
        [K] with K > 1 time buckets), float32, with s the canonical stream index (token count N
        descending).
    metadata: ``format``, ``version``, ``model_class``, ``config_hash`` (sha256 of the
        diffusers config as sorted JSON, "" without ``.config``), ``kind``, ``width`` (of the
        first block's first stream), ``rank`` (null = full), ``buckets`` K, ``timestep_max``,
        ``prior``, ``streams`` {block: [{"tokens": N, "width": D}, ...]}, ``samples`` {block:
        [token pairs per stream]}, ``bucket_samples`` {block: [[per bucket] per stream]},
        ``fit_error`` {block: [relative training error per stream]}, ``bucket_fit_error``,
        ``ridge`` {block: [lambda (list per bucket when K > 1) per stream]}, ``ridge_rule``
        ("gcv" or "fixed").
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        save(self, path)


def save(cal: Calibration, path: str | Path) -> None:
    """Write ``cal`` as safetensors; each metadata field is stored as a JSON string."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in cal.tensors.items()}, str(path),
              metadata={k: json.dumps(v) for k, v in cal.metadata.items()})


def load(path: str | Path) -> Calibration:
    """Read a calibration file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a fastcache_fx calibration.
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"calibration: no file {str(path)!r} (make one with fastcache_fx.calibrate "
                                "or `fastcache-fx calibrate`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"calibration: {path} is not a safetensors file ({e})") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"calibration: {path} is not a fastcache_fx calibration file (no format={FORMAT!r} metadata)")
    return Calibration(tensors, meta)


def _match_streams(name: str, file_streams: list[dict], model_shapes: list[tuple]) -> list[int]:
    """For each model stream (graph order) the file's canonical stream index.

    Exact (N, D) matches first; the rest by rank of N (calibrated at another resolution),
    whose width D must agree. The file may have more streams than the graph: an output the
    graph never uses is not a stream there (the text output of Flux's last single block).
    """
    if len(file_streams) < len(model_shapes):
        raise ValueError(f"calibration: block {name} has {len(file_streams)} stream(s) in file, "
                         f"model has {len(model_shapes)}")
    fmap: list[int | None] = [None] * len(model_shapes)
    free = list(range(len(file_streams)))
    for s, shape in enumerate(model_shapes):
        hit = next((f for f in free if (file_streams[f]["tokens"], file_streams[f]["width"]) == (shape[1], shape[-1])), None)
        if hit is not None:
            fmap[s] = hit
            free.remove(hit)
    rest = sorted((s for s in range(len(model_shapes)) if fmap[s] is None), key=lambda s: -model_shapes[s][1])
    for s, f in zip(rest, free):
        if file_streams[f]["width"] != model_shapes[s][-1]:
            raise ValueError(f"calibration: block {name} stream {s} has width {file_streams[f]['width']} in file, "
                             f"model has {model_shapes[s][-1]}")
        fmap[s] = f
    return fmap


def load_calibration(path: str | Path, regions, kind: str, model_info: dict | None = None,
                     rank: int | None = None, time_buckets: int = 1) -> dict[str, torch.Tensor]:
    """The weight inputs of the graph pass, from a calibration file.

    Args:
        path: a file written by ``calibrate`` / ``fastcache-fx calibrate``.
        regions: ``BlockRegion``s (``find_blocks(gm).regions``).
        kind: the approximation the graph uses ("linear" or "residual_linear").
        model_info: optional {"model_class", "config_hash"} (``model_info(model)``) to check the
            file against; empty values are not compared.
        rank, time_buckets: what the config asks for (``FastCacheConfig.rank / time_buckets``);
            the file must have been fitted with the same.

    Returns:
        {"<r.name>.<key>.<s>": tensor} float32 for every region r, stream s in the region's own
        (graph) order and key in ``ops.maps.weight_shapes``, shaped so:
        exactly the names of the ``WeightSpec``s that ``apply_block_cache`` creates.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a calibration file; fitted for another kind, model (class or config),
            rank or number of time buckets; no map for a block of ``regions``; fewer streams in
            the file than in the graph; another width. The message names what differs.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    cal = load(path)
    meta = cal.metadata
    if meta.get("kind") != kind:
        raise ValueError(f"calibration: {path} was fitted for approx={meta.get('kind')!r}, the graph uses approx={kind!r}")
    for k in ("model_class", "config_hash"):
        if model_info and model_info.get(k) and meta.get(k) and model_info[k] != meta[k]:
            raise ValueError(f"calibration: {path} is for another model: {k}={meta[k]!r} in file, "
                             f"the model has {k}={model_info[k]!r}")
    if meta.get("rank") != rank:
        raise ValueError(f"calibration: {path} has rank={meta.get('rank')!r}, the config asks for rank={rank!r} "
                         "(calibrate with the same rank)")
    if int(meta.get("buckets", 1)) != time_buckets:
        raise ValueError(f"calibration: {path} has time_buckets={meta.get('buckets', 1)!r}, the config asks for "
                         f"time_buckets={time_buckets!r}")
    streams = meta.get("streams", {})
    out: dict[str, torch.Tensor] = {}
    for r in regions:
        if r.name not in streams:
            raise ValueError(f"calibration: no map for block {r.name} in {path}")
        shapes = r.stream_shapes
        for s, f in enumerate(_match_streams(r.name, streams[r.name], shapes)):
            for key, shape in weight_shapes(shapes[s][-1], rank, time_buckets).items():
                t = cal.tensors.get(f"{r.name}.{key}.{f}")
                if t is None or tuple(t.shape) != shape:
                    raise ValueError(f"calibration: block {r.name} stream {s}: tensor {r.name}.{key}.{f} "
                                     f"missing or not {list(shape)}")
                out[f"{r.name}.{key}.{s}"] = t.float().contiguous()
    return out


# ----------------------------------------------------------------------------------------------
# the block-stack map of token selection (static_approx "linear" / "cached_linear")
# ----------------------------------------------------------------------------------------------

#: calibration kinds of the block-stack map, by the ``static_approx`` they serve
