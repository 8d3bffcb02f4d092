"""Load and run an exported cached transformer (``fastcache_fx.export``) without Dynamo.

    model = fastcache_fx.load_exported("out/")
    out = model(hidden_states=x, timestep=t, class_labels=y)   # out.sample, out[0]
    model.stats()["block_approx_ratio"]; model.reset()

Neither Dynamo nor the model's Python class is needed: an AOTInductor package is run by
``torch._inductor.aoti_load_package``; TensorRT pieces are ExportedPrograms run in order by
``ExportedTransformer`` (which picks each block's branch).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import torch

from .. import torch_compat
from ..contract import GraphContract, TensorSpec
from . import manifest as E


def _refuse(out_dir: Path, why: str) -> ValueError:
    return ValueError(f"load_exported({str(out_dir)!r}): {why}")


def read_manifest(out_dir) -> dict:
    """The checked manifest of an export folder.

    Raises:
        ValueError: missing or invalid ``manifest.json``, another fastcache-fx version or manifest
            version, a listed artifact missing or not matching its sha256.
    """
    out_dir = Path(out_dir)
    path = out_dir / E.MANIFEST
    if not path.is_file():
        raise _refuse(out_dir, f"no {E.MANIFEST} in this folder (not a fastcache_fx.export output)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _refuse(out_dir, f"{E.MANIFEST} is not valid JSON ({e})") from None
    required = ("format_id", "manifest_version", "format", "versions", "inputs", "outputs", "state", "controls",
                "blocks", "files", "num_graph_outputs", "outputs_extra", "config")
    if not isinstance(m, dict) or m.get("format_id") != E.MANIFEST_FORMAT:
        raise _refuse(out_dir, f"{E.MANIFEST} is not a fastcache_fx export manifest")
    missing = [k for k in required if k not in m]
    if missing:
        raise _refuse(out_dir, f"{E.MANIFEST} is corrupted: missing field(s) {missing}")
    if m["manifest_version"] != E.MANIFEST_VERSION:
        raise _refuse(out_dir, f"manifest version {m['manifest_version']!r}, this fastcache-fx reads {E.MANIFEST_VERSION}")
    from .._version import __version__

    theirs = (m.get("versions") or {}).get("fastcache_fx")
    if theirs != __version__:
        raise _refuse(out_dir, f"exported by fastcache-fx {theirs}, this is {__version__}; export again with this version")
    if m["format"] not in E.FORMATS:
        raise _refuse(out_dir, f"unknown format {m['format']!r}")
    for f, digest in m["files"].items():
        p = out_dir / f
        if not p.is_file():
            raise _refuse(out_dir, f"artifact {f} is missing")
        if E.sha256(p) != digest:
            raise _refuse(out_dir, f"artifact {f} does not match its sha256 in the manifest (corrupted or replaced)")
    return m


def _fill(x) -> float:
    return float(x)  # "-inf" strings too


def _contract(m: dict) -> GraphContract:
    """The exported graph's contract, as far as the loader needs it (state, extra outputs)."""
    state = [TensorSpec("state", s["name"], s["shape"], E.parse_dtype(s["dtype"]), _fill(s["fill"])) for s in m["state"]]
    return GraphContract(len(m["inputs"]), m["num_graph_outputs"], True, state, [tuple(o) for o in m["outputs_extra"]])


class ExportedTransformer:
    """A loaded export: call it like the transformer, with keyword (or positional) tensors.

    Returns what the model returned: for diffusers models an ``ExportedOutput`` named tuple
    with the model output's fields (``out.sample``, ``out[0]``); a tuple or a tensor otherwise.
    Shapes and dtypes must equal the manifest's (``ValueError`` otherwise). One cache state (one
    CFG context: batched CFG); a new trajectory starts when the timestep repeats or turns back or on
    ``reset()``. ``controls`` maps control names to tensors fed every call (``force`` [L] int8:
    -1 live decisions (default), 0 force full, 1 force the approximation).
    """

    def __init__(self, out_dir, manifest: dict, device=None) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.device = torch.device(device if device is not None else manifest.get("device", "cpu"))
        self.input_specs = [(i["name"], tuple(i["shape"]), E.parse_dtype(i["dtype"])) for i in manifest["inputs"]]
        self.static_kwargs = dict(manifest.get("static_kwargs") or {})
        self.blocks = list(manifest["blocks"])
        self.contract = _contract(manifest)
        self.controls = {c["name"]: torch.full(tuple(c["shape"]), _fill(c["fill"]), dtype=E.parse_dtype(c["dtype"]),
                                               device=self.device) for c in manifest["controls"]}
        out = manifest["outputs"]
        self._out_kind = out["kind"]
        self._out_index = list(out["index"])
        self._out_type = collections.namedtuple("ExportedOutput", out["names"]) if out["kind"] == "fields" else None
        self.trace: collections.deque = collections.deque(maxlen=int(manifest["config"].get("trace_steps", 10000)))
        self._pending_reset = True
        self._state: list[torch.Tensor] | None = None
        if manifest["format"] == "aotinductor":
            self._runner = torch_compat.aoti_load_package(str(self.out_dir / E.PACKAGE_FILE))
            self._program = None
        else:
            self._load_program()

    # loading the split program --------------------------------------------------------------
    def _load_program(self) -> None:
        prog = json.loads((self.out_dir / E.PROGRAM_FILE).read_text())
        for mod in prog.get("requires", []):
            try:
                __import__(mod)
            except ImportError as e:
                raise RuntimeError(f"load_exported: this export needs the {mod} package ({e}); "
                                   "pip install fastcache-fx[tensorrt]") from None
        self._program = prog
        self._engines = {}
        for p in prog["pieces"]:
            for key in (["glue"] if p["kind"] == "glue" else ["approx", "full"]):
                self._engines[p[key]] = torch.export.load(str(self.out_dir / p[key])).module()
        weights = {}
        if (self.out_dir / E.WEIGHTS_FILE).is_file():
            from safetensors.torch import load_file

            weights = {k: v.to(self.device) for k, v in load_file(str(self.out_dir / E.WEIGHTS_FILE)).items()}
        self._weights = weights
        self.branches = {p["name"]: {"approx": 0, "full": 0} for p in prog["pieces"] if p["kind"] == "block"}

    def _initial_state(self) -> list[torch.Tensor]:
        return self.contract.initial_state(self.device)

    # call -------------------------------------------------------------------------------------
    def _bind(self, args, kwargs) -> list[torch.Tensor]:
        names = [n for n, _, _ in self.input_specs]
        if len(args) > len(names):
            raise ValueError(f"expected at most {len(names)} positional tensors ({', '.join(names)}), got {len(args)}")
        got = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in got:
                raise ValueError(f"argument {k!r} given twice")
            got[k] = v
        for k, v in list(got.items()):
            if k in self.static_kwargs:
                if v != self.static_kwargs[k]:
                    raise ValueError(f"{k}={v!r}: this export was traced with {k}={self.static_kwargs[k]!r}")
                del got[k]
        unknown = sorted(set(got) - set(names))
        if unknown:
            raise ValueError(f"unexpected argument(s) {unknown}; this export takes {names}")
        out = []
        for name, shape, dtype in self.input_specs:
            if name not in got:
                raise ValueError(f"missing argument {name!r} (shape {list(shape)}, {dtype})")
            x = got[name]
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise ValueError(f"{name}: this export takes shape {list(shape)} {dtype}, got {list(x.shape)} {x.dtype} "
                                 "(export again for other shapes or dtypes)")
            out.append(x.to(self.device).contiguous())
        return out

    def __call__(self, *args, **kwargs):
        user = self._bind(args, kwargs)
        controls = [self.controls[c["name"]] for c in self.manifest["controls"]]
        with torch.no_grad():
            if self._program is None:
                reset = torch.tensor(self._pending_reset, device=self.device)
                outs = self._runner(*user, reset, *controls)
                ng = self.manifest["num_graph_outputs"]
                graph_outs = list(outs[:ng])
                step, delta, thr, ok = outs[ng:ng + 4]
            else:
                graph_outs, step, delta, thr, ok = self._run_program(user)
        self._pending_reset = False
        self.trace.append((int(step), delta, thr, ok))
        picked = [graph_outs[i] for i in self._out_index]
        if self._out_kind == "fields":
            return self._out_type(*picked)
        if self._out_kind == "tensor":
            return picked[0]
        return tuple(picked)

    def _run_program(self, user: list[torch.Tensor]):
        if self._pending_reset or self._state is None:
            self._state = self._initial_state()
        names = [n for n, _, _ in self.input_specs]
        env: dict[str, Any] = {}
        si = 0
        for spec in self._program["inputs"]:
            role = spec["role"]
            if role == "input":
                env[spec["value"]] = user[names.index(spec["arg"])]
            elif role == "state":
                env[spec["value"]] = self._state[si]
                si += 1
            elif role == "control":
                env[spec["value"]] = self.controls[spec["arg"]]
            elif role == "weight":
                env[spec["value"]] = self._weights[spec["arg"]]
            else:
                raise ValueError(f"program.json: unknown input role {role!r}")
        for p in self._program["pieces"]:
            ins = [env[n] for n in p["inputs"]]
            if p["kind"] == "glue":
                outs = self._engines[p["glue"]](*ins)
            else:
                which = "approx" if bool(env[p["pred"]]) else "full"
                self.branches[p["name"]][which] += 1
                outs = self._engines[p[which]](*ins)
            if isinstance(outs, torch.Tensor):
                outs = (outs,)
            env.update(zip(p["outputs"], outs))
        got = self.contract.split([env[n] for n in self._program["outputs"]])
        self._state = [t.contiguous() for t in got.state]
        return (got.user, self._state[self.contract.step_index], *got.trace)

    # state and statistics ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cache: the next call starts a trajectory with every block computed fully."""
        self._pending_reset = True
        self._state = None

    def stats(self) -> dict:
        """Decisions so far, in the format of ``fastcache_fx.stats`` (one graph, context "default")."""
        trace, counts = [], [0] * len(self.blocks)
        for step, delta, thr, ok in self.trace:
            approx = [bool(x) for x in ok.tolist()]
            trace.append({"context": "default", "step": step, "blocks": self.blocks, "approx": approx,
                          "delta": [float(x) for x in delta.tolist()], "threshold": [float(x) for x in thr.tolist()]})
            counts = [c + int(a) for c, a in zip(counts, approx)]
        n = len(trace)
        total = n * len(self.blocks)
        return {
            "block_approx_ratio": (sum(counts) / total) if total else 0.0,
            "per_block": {b: c / n for b, c in zip(self.blocks, counts)} if n else {},
            "steps": n, "blocks": list(self.blocks), "graphs": 1, "trace": trace,
        }


def load_exported(out_dir, device=None) -> ExportedTransformer:
    """Load an export folder written by ``fastcache_fx.export``.

    Args:
        out_dir: the folder holding ``manifest.json``.
        device: where inputs are moved (default: the device recorded at export time).

    Returns:
        an ``ExportedTransformer`` (callable with the transformer's keyword arguments, plus
        ``reset()`` and ``stats()``).

    Raises:
        ValueError: missing/corrupted manifest or artifact, another fastcache-fx version.
        RuntimeError: a TensorRT export loaded without ``torch_tensorrt``.
    """
    manifest = read_manifest(out_dir)
    return ExportedTransformer(out_dir, manifest, device)
