"""Export the cached graph for deployment without Dynamo: AOTInductor packages, TensorRT engines.

    fastcache_fx.export(transformer, dict(hidden_states=x, timestep=t, class_labels=y), "out/",
                        format="aotinductor", config=FastCacheConfig(...))
    model = fastcache_fx.load_exported("out/")

How: Dynamo traces the transformer once (a capturing backend, ``fullgraph=True``,
``dynamic=False``), ``passes.block_cache`` rewrites the graph exactly as the backend does, then

- ``format="aotinductor"``: ``CachedGraphModule`` wraps the rewritten graph as an ``nn.Module``
  whose cache state (the graph contract's state, ``contract.GraphContract``) lives in buffers
  updated in ``forward``;
  ``torch.export`` traces it (one ``torch.cond`` per block, mutable buffers) and
  ``torch._inductor.aoti_compile_and_package`` writes ``model.pt2``;
- ``format="tensorrt"``: ``lowering.split`` cuts the graph into glue and per-block branch pieces,
  each lowered to a Torch-TensorRT engine and saved as an ExportedProgram; ``program.json`` says
  how to run them, and the loader keeps the state and picks the branches.

``out_dir/manifest.json`` records everything the loader checks (see ``write_manifest``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import fx

from .. import torch_compat
from ..config import FastCacheConfig
from .. import approx as approx_kinds
from ..passes.block_cache import BlockCacheResult, apply_block_cache
from ..passes.blocks import find_blocks
from ..lowering.engine_format import EngineFormat
from .manifest import FORMATS, PACKAGE_FILE, PROGRAM_FILE, WEIGHTS_FILE, write_manifest

# ------------------------------------------------------------------------------------------
# capture and rewrite


@dataclass
class CapturedGraph:
    """One Dynamo graph of the transformer and how its placeholders map to the call.

    ``roles[i]`` is ("input", name) for a user tensor argument or ("const", None) for a
    parameter/buffer (real value in ``example_inputs[i]``). ``outputs`` describes how the
    model's return value is built from the graph outputs: {"kind": "fields", "names": [...],
    "index": [...]} (diffusers ``BaseOutput``), {"kind": "tuple", "index": [...]} or
    {"kind": "tensor", "index": [i]}.
    """

    gm: fx.GraphModule
    example_inputs: list
    roles: list[tuple[str, str | None]]
    inputs: dict[str, torch.Tensor]
    static_kwargs: dict[str, Any]
    outputs: dict


def _bind_inputs(model: torch.nn.Module, example_inputs) -> dict[str, Any]:
    if isinstance(example_inputs, Mapping):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    sig = inspect.signature(model.forward)
    return dict(sig.bind_partial(*example_inputs).arguments)


def capture(model: torch.nn.Module, example_inputs) -> CapturedGraph:
    """Trace ``model`` once with Dynamo (fullgraph, static shapes) and keep the FX graph.

    Args:
        model: the transformer (``nn.Module``; a compiled module's ``_orig_mod`` is used).
        example_inputs: keyword arguments (dict) or positional arguments of ``model.forward``.

    Raises:
        ValueError: a non-tensor argument that is not JSON (None/bool/int/float/str), or a graph
            input that is neither an argument nor a parameter.
    """
    model = getattr(model, "_orig_mod", model)
    kwargs = _bind_inputs(model, example_inputs)
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    static = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            continue
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"example_inputs[{k!r}]: only tensors and None/bool/int/float/str values can be "
                             f"exported, got {type(v).__name__}")
        static[k] = v
    box: dict = {}

    def capturing_backend(gm, ex, **_kw):
        box["gm"], box["ex"] = gm, list(ex)

        def run(*args):
            outs = gm(*args)
            box["outs"] = outs
            return outs

        return run

    # no torch.compiler.reset() here: it would drop the caller's other compiled models
    with torch.no_grad():
        try:
            result = torch.compile(model, backend=capturing_backend, fullgraph=True, dynamic=False)(**kwargs)
        except torch_compat.recompile_limit_error():
            box.clear()
        if "gm" not in box:  # Dynamo's recompile limit reached by earlier traces of this model's class
            torch.compiler.reset()
            result = torch.compile(model, backend=capturing_backend, fullgraph=True, dynamic=False)(**kwargs)
    gm, ex, outs = box["gm"], box["ex"], box["outs"]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    by_id = {id(v): k for k, v in tensors.items()}
    roles = []
    for n, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], ex):
        if isinstance(x, torch.Tensor) and id(x) in by_id:
            roles.append(("input", by_id[id(x)]))
        elif isinstance(x, torch.Tensor):
            roles.append(("const", None))
        else:
            raise ValueError(f"export: graph input {n.name} is a {type(x).__name__}, not a tensor (dynamic shapes?)")

    def index_of(t) -> int:
        for i, o in enumerate(outs):
            if o is t:
                return i
        raise ValueError("export: the model's output is not a graph output (computed outside the graph?)")

    if isinstance(result, torch.Tensor):
        layout = {"kind": "tensor", "index": [index_of(result)]}
    elif isinstance(result, Mapping):  # diffusers BaseOutput (an OrderedDict)
        names = [k for k, v in result.items() if v is not None]
        layout = {"kind": "fields", "names": names, "index": [index_of(result[k]) for k in names]}
    elif isinstance(result, (tuple, list)):
        layout = {"kind": "tuple", "index": [index_of(t) for t in result]}
    else:
        raise ValueError(f"export: unsupported model output type {type(result).__name__}")
    return CapturedGraph(gm, ex, roles, tensors, static, layout)


def rewrite(captured: CapturedGraph, config: FastCacheConfig):
    """The backend's rewrite of a captured graph.

    Returns:
        (rewritten gm, BlockCacheResult, calibrated weights {spec name: tensor}, approx kind).

    Raises:
        ValueError: no transformer block was recognised (nothing to cache).
    """
    from ..compat import Target, check

    config = check(config, Target(export=True))
    search = find_blocks(captured.gm)
    if not search.regions:
        raise ValueError("export: no transformer blocks recognised in the model's graph"
                         + (f" (left alone: {search.left_alone})" if search.left_alone else ""))
    kind = approx_kinds.resolve(config)
    weights = kind.weights(config, search.regions)
    gm, layout = apply_block_cache(captured.gm, config, search.regions, approx=kind)
    if layout.accums:
        raise ValueError("FastCacheConfig.calibration: export needs fixed maps, the graph has online accumulators")
    return gm, layout, weights, kind.name


def extra_values(layout: BlockCacheResult, weights: Mapping[str, torch.Tensor], device) -> list[torch.Tensor]:
    """Initial values of the graph's extra inputs: fills for state and controls, the weights."""
    c = layout.contract
    return c.bind(c.initial_state(device), {s.name: s.initial(device) for s in c.controls},
                  {s.name: weights[s.name].to(device).contiguous() for s in c.weights})


# ------------------------------------------------------------------------------------------
# AOTInductor


class CachedGraphModule(torch.nn.Module):
    """The rewritten graph as a stateful module for ``torch.export``.

    ``forward(*user_inputs, reset, *controls)``: ``user_inputs`` in ``input_names`` order,
    ``reset`` a [] bool tensor (True: start from the initial state, as ``fastcache_fx.reset``),
    ``controls`` one tensor per control spec (``force`` [L] int8: -1 decides live). Returns
    ``(*user_outputs, step [] int64, delta [L] f32, threshold [L] f32, approx [L] bool)``. The
    cache state lives in buffers ``state_<i>`` updated in place (mutable buffers under export);
    parameters and calibrated weights are buffers ``const_<i>`` / ``weight_<i>``.
    """

    def __init__(self, gm: fx.GraphModule, captured: CapturedGraph, layout: BlockCacheResult,
                 weights: Mapping[str, torch.Tensor], device) -> None:
        super().__init__()
        self.gm = gm
        self.layout = layout
        self.input_names = list(captured.inputs)
        self.slots: list[tuple[str, Any]] = []  # per rewritten-graph placeholder
        for i, ((role, name), x) in enumerate(zip(captured.roles, captured.example_inputs)):
            if role == "input":
                self.slots.append(("input", self.input_names.index(name)))
            else:
                self.register_buffer(f"const_{i}", x.detach().to(device).contiguous())
                self.slots.append(("const", f"const_{i}"))
        c = layout.contract
        self.fills = [s.fill for s in c.state]
        for i, s in enumerate(c.state):
            self.register_buffer(f"state_{i}", s.initial(device))
        for i, s in enumerate(c.weights):
            self.register_buffer(f"weight_{i}", weights[s.name].detach().to(device).contiguous())
        self.controls = [s.name for s in c.controls]
        self.num_state = len(c.state)

    def forward(self, *args):
        nu = len(self.input_names)
        user, reset, controls = args[:nu], args[nu], args[nu + 1:]
        state = []
        for i in range(self.num_state):
            buf = getattr(self, f"state_{i}")
            state.append(torch.where(reset, torch.full_like(buf, self.fills[i]), buf).contiguous())
        c = self.layout.contract
        graph_inputs = [user[ref] if kind == "input" else getattr(self, ref) for kind, ref in self.slots]
        weights = {s.name: getattr(self, f"weight_{i}") for i, s in enumerate(c.weights)}
        outs = self.gm(*graph_inputs, *c.bind(state, dict(zip(self.controls, controls)), weights))
        got = c.split(outs)
        for i, v in enumerate(got.state):
            getattr(self, f"state_{i}").copy_(v)
        return (*got.user, got.state[c.step_index], *got.trace)


def _call_args(captured: CapturedGraph, layout: BlockCacheResult, device) -> tuple:
    user = [captured.inputs[k] for k in captured.inputs]
    controls = [s.initial(device) for s in layout.contract.controls]
    return (*user, torch.tensor(True, device=device), *controls)


def _export_aotinductor(captured, gm, layout, weights, device, out_dir: Path) -> list[str]:
    module = CachedGraphModule(gm, captured, layout, weights, device).eval()
    args = _call_args(captured, layout, device)
    with torch.no_grad():
        ep = torch.export.export(module, args, strict=False)
        torch_compat.aoti_compile_and_package(ep, package_path=str(out_dir / PACKAGE_FILE))
    return [PACKAGE_FILE]


# ------------------------------------------------------------------------------------------
# split pieces (TensorRT, or another engine compiler)


def _export_split(captured, gm, layout, weights, device, out_dir: Path, engine_format: EngineFormat) -> tuple[list[str], dict]:
    from ..lowering.split import compile_split

    example = list(captured.example_inputs) + extra_values(layout, weights, device)
    built: dict[str, tuple] = {}

    def compiler(piece_gm, ins, name):
        engine = engine_format.compile(piece_gm, ins, name)
        built[name] = (engine, piece_gm, ins)
        return engine

    program = compile_split(gm, example, compiler, layout.blocks)
    files, pieces = [], []
    for p in program.pieces:
        entry = {"kind": p.kind, "name": p.name, "inputs": p.inputs, "outputs": p.outputs}
        keys = ["glue"] if p.kind == "glue" else ["approx", "full"]
        if p.kind == "block":
            entry["pred"] = p.pred
        for key in keys:
            label = p.name if p.kind == "glue" else f"{p.name}.{key}"
            fname = "engines/" + "".join(c if c.isalnum() or c in "._-" else "_" for c in label) + ".pt2"
            (out_dir / "engines").mkdir(exist_ok=True)
            engine, piece_gm, ins = built[label]
            engine_format.save(engine, piece_gm, ins, out_dir / fname)
            entry[key] = fname
            files.append(fname)
        pieces.append(entry)
    # program inputs: one per rewritten-graph placeholder (None = baked parameter)
    roles = []
    names = program.input_names
    nu = len(captured.roles)
    for i, name in enumerate(names):
        if i < nu:
            role, arg = captured.roles[i]
            roles.append(None if name is None else {"value": name, "role": role, "arg": arg})
        else:
            spec = layout.extra_inputs[i - nu]
            roles.append({"value": name, "role": spec.role, "arg": spec.name})
    prog = {"engine_format": engine_format.name, "requires": list(engine_format.requires),
            "inputs": [r for r in roles if r is not None], "outputs": program.output_names, "pieces": pieces}
    (out_dir / PROGRAM_FILE).write_text(json.dumps(prog, indent=1) + "\n")
    return files + [PROGRAM_FILE], prog


# ------------------------------------------------------------------------------------------
# manifest and the public entry point


def export(transformer: torch.nn.Module, example_inputs, out_dir, format: str = "aotinductor",
           config: FastCacheConfig | Mapping | None = None, *, engine_format: EngineFormat | None = None) -> Path:
    """Export ``transformer`` with FastCache's block cache in its graph, for serving without Dynamo.

    The graph is the backend's: every block a ``torch.cond(approx?, approximation, full block)``
    with the configured decision rule inside (the measured-error rule by default, or the paper's
    chi-square test, FastCache arXiv 2505.20353 sec. 3.2), the cache state
    carried between calls. Shapes and dtypes are fixed to ``example_inputs`` (one export per
    resolution/batch size; batched CFG = one context).

    Args:
        transformer: a diffusers DiT (or any model the backend rewrites), on the target device.
        example_inputs: keyword arguments (dict, e.g. ``hidden_states=[B, C, H, W]``,
            ``timestep=[B]``, ``class_labels=[B]``) or positional arguments of ``forward``.
        out_dir: created if missing; receives ``manifest.json``, the artifact(s) and
            ``weights.safetensors`` when the approximation uses calibrated linear maps.
        format: "aotinductor" (``model.pt2``, any device Inductor supports) or "tensorrt"
            (``engines/*.pt2`` + ``program.json``; CUDA and ``torch_tensorrt`` required).
        config: FastCacheConfig (or a dict of its fields); defaults when None.
        engine_format: for ``format="tensorrt"`` only: another piece lowering (the CPU tests
            pass ``EngineFormat()``, plain ``torch.export`` programs); default TensorRT.

    Returns:
        the path of ``manifest.json``.

    Raises:
        ValueError: unknown format, bad config field, no blocks found, unsupported inputs.
        RuntimeError: format="tensorrt" without CUDA or without ``torch_tensorrt``.
    """
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    config = config if isinstance(config, FastCacheConfig) else FastCacheConfig.from_options(config)
    if format == "tensorrt" and engine_format is None:
        from ..lowering.tensorrt import TensorRTFormat, require_tensorrt

        require_tensorrt("export(format='tensorrt')")
        engine_format = TensorRTFormat()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    captured = capture(transformer, example_inputs)
    gm, layout, weights, approx = rewrite(captured, config)
    device = next(iter(captured.inputs.values())).device if captured.inputs else torch.device("cpu")
    if format == "aotinductor":
        files = _export_aotinductor(captured, gm, layout, weights, device, out_dir)
        engine_name = "aotinductor"
    else:
        files, _ = _export_split(captured, gm, layout, weights, device, out_dir, engine_format)
        engine_name = engine_format.name
    if weights:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(out_dir / WEIGHTS_FILE))
        files.append(WEIGHTS_FILE)
    return write_manifest(out_dir, format=format, engine=engine_name, transformer=transformer, device=device,
                          config=config, approx=approx, layout=layout, captured=captured, files=files)
