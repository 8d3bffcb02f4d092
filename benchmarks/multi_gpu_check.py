"""Multi-GPU check of the block cache under sequence (context) parallelism (issue #15), not run in CI.

    torchrun --nproc_per_node 2 benchmarks/multi_gpu_check.py [--steps 10] [--image 32] [--text 64]
        [--frameworks diffusers,xdit] [--parallel ulysses,ring,usp] [--variants eager,inductor,off,on]
        [--out-json benchmarks/multi_gpu_check.json] [--pg-timeout 300]

Wrap it in ``timeout`` (e.g. ``timeout 1800 torchrun ...``): if the ranks of a fastcache run take
different branches, one enters an attention collective the other never reaches and the job hangs
until the process-group timeout (``--pg-timeout``) aborts it. The rows that can hang run last
(phase "approx"), and rank 0 rewrites the JSON after every row, so the rows before survive.

Model: a Flux-type ``FluxTransformer2DModel`` with random weights (same seed on every rank),
batch 1, ``--image``^2 image tokens and ``--text`` text tokens. Two teacher-forced trajectories
(every variant gets exactly the same inputs, broadcast from rank 0):

- ``smooth``: timesteps 1 -> 1/steps, hidden states of an Euler flow-matching loop of the
  single-process eager model;
- ``one-shard``: same timesteps, but from step 1 on only the last rank's sequence shard of the
  hidden states changes. Without an all-reduce of the decision statistics rank 0 sees no change
  and approximates while the last rank computes: the case that splits decisions.

For every framework and parallel layout the same model runs on the full sequence in one process
(on every rank, no parallelism) and sharded over all ranks:

(a) ``diffusers``: ``model.set_attention_backend(...)`` +
    ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=..., ring_degree=...))``.
(b) ``xdit``: xDiT's (``xfuser``) sequence-parallel path as its Flux runner builds it:
    ``init_distributed_environment`` + ``initialize_model_parallel(ulysses_degree, ring_degree)``,
    ``xFuserArgs(...).create_config()``, the transformer built as
    ``xFuserFlux1Transformer2DWrapper`` (shards the sequence, USP attention processors, gathers the
    output), ``initialize_runtime_state`` and ``get_runtime_state().set_input_parameters(...)``.
    Skipped with a note when ``xfuser`` is not importable.

Layouts: ``ulysses`` (degree = world size, float32, diffusers backend "native", xDiT "SDPA");
``ring`` (degree = world size) and ``usp`` (ulysses 2 x ring world/2, needs >= 4 ranks) need an
attention kernel that returns the log-sum-exp: bfloat16, diffusers "_native_flash", xDiT
"SDPA_FLASH" (override with --ring-dtype / --diffusers-ring-backend / --xdit-ring-backend).

Variants: ``eager``; ``inductor`` (plain ``torch.compile``); ``off`` =
``torch.compile(model, backend="fastcache", options={"enable_block_approx": False})``; ``on`` =
the same with approximation, ``cache_ratio_threshold`` set to the median block delta of the
single-process ``off`` run on that trajectory (about half the block-steps approximate).
Each parallel run is compared with the same variant in one process: max relative error of the
per-step outputs, and for fastcache the decisions (``fastcache_fx.stats(model)["trace"]``): equal
to one process (mismatches where the single-process delta lies within 1 % of the threshold are
counted apart, as numerics), and equal on every rank (must hold exactly: all ranks take one
branch). Prints a table, writes JSON. On a machine with fewer than 2 CUDA devices it prints one
"skipped" line and exits 0; exits with status 2 and a message when not launched by torchrun with
>= 2 processes; 1 when a row fails.

``--cpu``: a gloo dry run on CPU for checking this script (tiny model). It patches
``torch.accelerator.device_count`` (0 on CPU; diffusers' ``_resolve_parallel_config`` divides by
it) and, for xDiT, applies the CPU shims of docs/xdit_cpu_findings.md. Not a GPU substitute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
NEAR = 0.01  # decision mismatches with |delta - thr| <= NEAR * thr (single process) count as numerics


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="steps per trajectory (default 10)")
    p.add_argument("--image", type=int, default=32, help="latent side: image tokens = image^2 (default 32)")
    p.add_argument("--text", type=int, default=64, help="text tokens (default 64)")
    p.add_argument("--frameworks", default="diffusers,xdit")
    p.add_argument("--parallel", default="ulysses,ring,usp", help="layouts: ulysses, ring, usp")
    p.add_argument("--variants", default="eager,inductor,off,on")
    p.add_argument("--trajectories", default="smooth,one-shard")
    p.add_argument("--options", default="{}", help="extra fastcache options, JSON (merged into off/on)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the ulysses rows")
    p.add_argument("--ring-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--diffusers-ring-backend", default="_native_flash")
    p.add_argument("--xdit-ring-backend", default="SDPA_FLASH")
    p.add_argument("--pg-timeout", type=int, default=300, help="process-group timeout in seconds")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "multi_gpu_check.json")
    p.add_argument("--cpu", action="store_true", help="gloo dry run on CPU (tiny model), to check the script")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- environment

def skip_reason(args) -> str | None:
    """Why this machine cannot run the check at all (fewer than 2 CUDA devices), or None. A skip,
    not a failure: the lent single-GPU machines run benchmarks/gpu_check.py instead."""
    if args.cpu:
        return None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n >= 2:
        return None
    return (f"multi_gpu_check: skipped: needs 2 or more CUDA devices, found {n} (run it on such a machine with "
            "torchrun --nproc_per_node N; `--cpu` is a gloo dry run of the script on CPU)")


def check_environment(args) -> str | None:
    """None when the run can go on, else the message for exit status 2."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    launch = "launch it with torchrun --nproc_per_node N (N >= 2), e.g. `timeout 1800 torchrun --nproc_per_node 2 " \
             "benchmarks/multi_gpu_check.py`"
    if not args.cpu:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local > n:
            return f"multi_gpu_check: {local} processes on this node but {n} CUDA devices: use --nproc_per_node <= {n}."
    if world < 2 or "RANK" not in os.environ:
        return f"multi_gpu_check: not launched by torchrun with 2 or more processes (WORLD_SIZE={world or 'unset'}): {launch}."
    if not args.cpu and ((args.image * args.image) % world or args.text % world):
        return (f"multi_gpu_check: --image^2 ({args.image ** 2}) and --text ({args.text}) must be divisible by the "
                f"world size {world} (both frameworks shard the tokens evenly).")
    return None


class Dist:
    """The process group and this rank's device."""

    def __init__(self, args):
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.cpu = args.cpu
        if args.cpu:
            self.device, self.backend = torch.device("cpu"), "gloo"
            # diffusers' _resolve_parallel_config computes rank % torch.accelerator.device_count(), 0 on CPU
            torch.accelerator.device_count = lambda: 1
        else:
            self.device, self.backend = torch.device("cuda", self.local_rank), "nccl"
            torch.cuda.set_device(self.device)
        timeout = datetime.timedelta(seconds=args.pg_timeout)
        # Subgroups made by new_group(timeout=None) (xfuser's, yunchang's) get torch's default timeout
        # (30 min gloo, 10 min NCCL), not the default group's: bound a hang in them as well.
        from torch.distributed import distributed_c10d
        distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
        dist.init_process_group(self.backend, timeout=timeout)

    def sync(self):
        if not self.cpu:
            torch.cuda.synchronize(self.device)

    def same_on_all(self, obj) -> bool:
        got = [None] * self.world
        dist.all_gather_object(got, obj)
        return all(g == got[0] for g in got)

    def from_rank0(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def log(d: Dist, *msg):
    if d.rank == 0:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- model and trajectories

def flux_config(args, world: int) -> dict:
    if args.cpu:
        heads = 2 * world
        return dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                    num_attention_heads=heads, joint_attention_dim=12, pooled_projection_dim=10,
                    axes_dims_rope=(2, 2, 4))
    heads = max(8, world)
    heads += (-heads) % world
    return dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
                num_attention_heads=heads, joint_attention_dim=256, pooled_projection_dim=128,
                axes_dims_rope=(16, 24, 24))


def base_inputs(cfg: dict, side: int, text: int, device, dtype) -> dict:
    g = torch.Generator().manual_seed(1)
    n = side * side
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kw = dict(hidden_states=torch.randn(1, n, cfg["in_channels"], generator=g),
              encoder_hidden_states=torch.randn(1, text, cfg["joint_attention_dim"], generator=g),
              pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
              img_ids=img_ids.reshape(n, 3), txt_ids=torch.zeros(text, 3))
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() and k.endswith(("states", "projections"))
                    else v.dtype) for k, v in kw.items()}


def trajectories(d: Dist, model, kw0: dict, steps: int, names) -> dict:
    """name -> list of per-step kwargs (teacher forcing; tensors broadcast from rank 0)."""
    dtype = kw0["hidden_states"].dtype
    ts = [1.0 - s / steps for s in range(steps)]
    out = {}
    if "smooth" in names:
        x, seq = kw0["hidden_states"].clone(), []
        with torch.no_grad():
            for s, t in enumerate(ts):
                step = {**kw0, "hidden_states": x.clone(), "timestep": torch.tensor([t], device=d.device, dtype=dtype)}
                seq.append(step)
                v = model(**step, return_dict=False)[0]
                x = x + ((ts[s + 1] if s + 1 < steps else 0.0) - t) * v
        out["smooth"] = seq
    if "one-shard" in names:
        x0 = kw0["hidden_states"]
        n = x0.shape[1]
        lo = n - n // d.world  # the last rank's contiguous shard (diffusers and xDiT split dim 1 in order)
        g = torch.Generator().manual_seed(2)
        noise = torch.randn(x0[:, lo:].shape, generator=g).to(device=d.device, dtype=dtype)
        seq = []
        for s, t in enumerate(ts):
            x = x0.clone()
            x[:, lo:] += 0.05 * s * noise
            seq.append({**kw0, "hidden_states": x, "timestep": torch.tensor([t], device=d.device, dtype=dtype)})
        out["one-shard"] = seq
    for seq in out.values():
        for step in seq:
            dist.broadcast(step["hidden_states"], src=0)
    return out


# ----------------------------------------------------------------------------- runs

def run(d: Dist, model, variant: str, options: dict | None, trajs: list[list[dict]]):
    """Compile ``model`` as ``variant`` and run the trajectories in turn (fastcache state reset
    between them). Returns one record per trajectory: outputs (float32, CPU), ms per step
    (median without step 0), decisions / deltas / thresholds for fastcache."""
    import fastcache_fx

    torch._dynamo.reset()
    if variant == "eager":
        fn = model
    elif variant == "inductor":
        fn = torch.compile(model, dynamic=False)
    else:
        fn = torch.compile(model, backend="fastcache", options=options, dynamic=False)
    recs = []
    for traj in trajs:
        if variant in ("off", "on"):
            fastcache_fx.reset(model)
            seen = len(fastcache_fx.stats(model)["trace"])
        outs, ms = [], []
        with torch.no_grad():
            for step in traj:
                d.sync()
                t0 = time.perf_counter()
                y = fn(**step, return_dict=False)[0]
                d.sync()
                ms.append(1e3 * (time.perf_counter() - t0))
                outs.append(y.detach().float().cpu())
        rec = {"outs": outs, "ms": statistics.median(ms[1:]) if len(ms) > 1 else ms[0]}
        if variant in ("off", "on"):
            st = fastcache_fx.stats(model)
            tr = st["trace"][seen:]
            rec.update(decisions=[r["approx"] for r in tr], deltas=[r["delta"] for r in tr],
                       thresholds=[r["threshold"] for r in tr], steps=[r["step"] for r in tr])
        recs.append(rec)
    return recs


def median_delta(rec: dict, warmup: int) -> float:
    vals = [x for s, row in zip(rec["steps"], rec["deltas"]) if s >= warmup for x in row if x == x and x != float("inf")]
    return float(statistics.median(vals)) if vals else 0.05


def compare(d: Dist, par: dict, ref: dict) -> dict:
    err = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(par["outs"], ref["outs"]))
    row = {"max_rel_err": err, "ms_per_step": par["ms"]}
    if "decisions" in par:
        flat = [a for r in par["decisions"] for a in r]
        row["approx_ratio"] = sum(flat) / len(flat) if flat else 0.0
        mism, near = 0, 0
        first = None
        for s, (pr, rr) in enumerate(zip(par["decisions"], ref["decisions"])):
            for b, (x, y) in enumerate(zip(pr, rr)):
                if x != y:
                    dl, th = ref["deltas"][s][b], ref["thresholds"][s][b]
                    if abs(dl - th) <= NEAR * th:
                        near += 1
                    else:
                        mism += 1
                        first = (s, b) if first is None else first
        row.update(decision_mismatches=mism, near_threshold_mismatches=near, first_mismatch=first,
                   decisions_equal_single=(mism == 0 and near == 0 and len(par["decisions"]) == len(ref["decisions"])),
                   ranks_agree=d.same_on_all(par["decisions"]))
    return row


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def verdict(row: dict, variant: str, tol: float) -> str:
    if "error" in row:
        return "ERROR"
    ok = row["max_rel_err"] <= tol
    if variant == "off":
        ok = ok and row["approx_ratio"] == 0.0
    if variant == "on":
        if not row["ranks_agree"]:
            return "FAIL (ranks disagree)"
        if row["decision_mismatches"]:
            return "FAIL (decisions differ from one process)"
        ok = ok or row["near_threshold_mismatches"] > 0  # a near-threshold flip changes the outputs legitimately
    return "ok" if ok else "FAIL (outputs)"


# ----------------------------------------------------------------------------- frameworks

LAYOUTS = {"ulysses": lambda w: (w, 1), "ring": lambda w: (1, w), "usp": lambda w: (2, w // 2)}


class Diffusers:
    name = "diffusers"

    def __init__(self, d: Dist, args):
        self.d, self.args, self.meshes = d, args, {}

    def available(self, layout: str) -> str | None:
        if layout != "ulysses" and self.d.cpu:
            return "no CPU attention backend in diffusers returns the LSE that ring attention needs"
        return None

    def build(self, cfg, state, dtype, layout):
        from diffusers import ContextParallelConfig, FluxTransformer2DModel

        u, r = LAYOUTS[layout](self.d.world)
        model = FluxTransformer2DModel(**cfg).eval()
        model.load_state_dict(state)
        model.to(device=self.d.device, dtype=dtype)
        model.set_attention_backend("native" if layout == "ulysses" else self.args.diffusers_ring_backend)
        if (u, r) not in self.meshes:
            self.meshes[(u, r)] = torch.distributed.device_mesh.init_device_mesh(
                self.d.device.type, (r, u), mesh_dim_names=("ring", "ulysses"))
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r, mesh=self.meshes[(u, r)]))
        return model


class XDiT:
    name = "xdit"

    def __init__(self, d: Dist, args):
        self.d, self.args, self.layout = d, args, None
        self.missing = None
        try:
            self.xfuser = _import_xfuser(cpu=args.cpu)
        except Exception as e:  # not installed, or its import needs what this machine lacks
            self.missing = f"xfuser not importable: {type(e).__name__}: {e}"

    def available(self, layout: str) -> str | None:
        return self.missing

    def _parallel(self, layout: str, attn: str):
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import init_distributed_environment, initialize_model_parallel
        from xfuser.core.distributed.parallel_state import destroy_model_parallel, model_parallel_is_initialized

        u, r = LAYOUTS[layout](self.d.world)
        if self.layout != layout:
            if model_parallel_is_initialized():
                destroy_model_parallel()
            # the default group exists already: this only builds xfuser's world GroupCoordinator
            init_distributed_environment(rank=self.d.rank, world_size=self.d.world, local_rank=self.d.local_rank,
                                         backend=self.d.backend)
            initialize_model_parallel(sequence_parallel_degree=u * r, ulysses_degree=u, ring_degree=r,
                                      backend=self.d.backend)
            self.layout = layout
        engine_config, _ = xFuserArgs(model="random-flux", ulysses_degree=u, ring_degree=r,
                                      attention_backend=attn).create_config()
        return engine_config

    def build(self, cfg, state, dtype, layout):
        from xfuser.core.distributed.runtime_state import get_runtime_state, initialize_runtime_state
        from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

        attn = "SDPA" if layout == "ulysses" else self.args.xdit_ring_backend
        engine_config = self._parallel(layout, attn)
        model = xFuserFlux1Transformer2DWrapper(**cfg).eval()  # its processors read the SP group: build after it
        model.load_state_dict(state)
        model.to(device=self.d.device, dtype=dtype)

        class FluxPipelineStub:  # what DiTRuntimeState reads from a pipeline; the class name must start with "Flux"
            transformer = model
            vae_scale_factor = 8

        initialize_runtime_state(FluxPipelineStub(), engine_config)
        side, text = self.args.image, self.args.text
        # as xfuser's Flux runner does before each pipeline call (runner_models/flux.py, _run_pipe)
        get_runtime_state().set_input_parameters(height=side * 16, width=side * 16, batch_size=1,
                                                 num_inference_steps=self.args.steps,
                                                 max_condition_sequence_length=text, split_text_embed_in_sp=True)
        return model


def _import_xfuser(cpu: bool):
    """``import xfuser``; with ``cpu`` first the shims xfuser 0.7 needs without CUDA
    (docs/xdit_cpu_findings.md), from the CPU test worker (one copy of them)."""
    if not cpu:
        import xfuser
        return xfuser
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from xdit_worker import import_xfuser_on_cpu

    return import_xfuser_on_cpu(ring=True)


# ----------------------------------------------------------------------------- main

def environment(d: Dist) -> dict:
    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "world_size": d.world, "backend": d.backend,
           "device": "cpu" if d.cpu else torch.cuda.get_device_name(d.device)}
    try:
        from importlib.metadata import version
        env["xfuser"] = version("xfuser")
    except Exception:
        env["xfuser"] = None
    return env


def write(d: Dist, path: Path, env: dict, rows: list):
    if d.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")


def print_table(rows: list):
    head = ["framework", "layout", "dtype", "variant", "trajectory", "max rel err", "approx", "= 1 proc",
            "ranks agree", "ms/step", "status"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        eq = r.get("decisions_equal_single")
        eqs = "" if eq is None else ("yes" if eq else f"no ({r['decision_mismatches']}+{r['near_threshold_mismatches']} near)")
        cells = [r["framework"], r["layout"], r["dtype"], r["variant"], r["trajectory"],
                 f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "",
                 f"{r['approx_ratio']:.2f}" if "approx_ratio" in r else "", eqs,
                 "" if "ranks_agree" not in r else ("yes" if r["ranks_agree"] else "NO"),
                 f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "", r["status"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    skip = skip_reason(args)
    if skip:
        print(skip, flush=True)
        return 0
    msg = check_environment(args)
    if msg:
        print(msg, file=sys.stderr)
        return 2
    if args.cpu:
        args.image, args.text, args.steps = min(args.image, 4), min(args.text, 8), min(args.steps, 5)
    import fastcache_fx  # noqa: F401  (registers nothing itself: backend="fastcache" is an entry point)

    if "fastcache" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(name="fastcache")(fastcache_fx.fastcache_backend)

    d = Dist(args)
    env = environment(d)
    variants = [v for v in args.variants.split(",") if v]
    traj_names = [t for t in args.trajectories.split(",") if t]
    user_options = json.loads(args.options)
    warmup = int(user_options.get("warmup_steps", 2))
    cfg = flux_config(args, d.world)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    state = FluxTransformer2DModel(**cfg).eval().state_dict()  # same seed on every rank: same weights

    frameworks = {}
    for name in [f for f in args.frameworks.split(",") if f]:
        frameworks[name] = Diffusers(d, args) if name == "diffusers" else XDiT(d, args)
    layouts = [l for l in args.parallel.split(",") if l]
    if d.world < 4 or d.world % 2:
        layouts = [l for l in layouts if l != "usp"]

    singles, trajs_by_dtype, taus, rows = {}, {}, {}, []

    def single_model(dtype):
        m = FluxTransformer2DModel(**cfg).eval()
        m.load_state_dict(state)
        return m.to(device=d.device, dtype=dtype)

    def get_trajs(dtype):
        if dtype not in trajs_by_dtype:
            kw0 = base_inputs(cfg, args.image, args.text, d.device, dtype)
            trajs_by_dtype[dtype] = trajectories(d, single_model(dtype), kw0, args.steps, traj_names)
        return trajs_by_dtype[dtype]

    def options_for(variant, dtype, tname):
        if variant == "off":
            return {**user_options, "enable_block_approx": False}
        key = (dtype, tname)
        if key not in taus:
            off = single("off", dtype)[tname]
            taus[key] = d.from_rank0(median_delta(off, warmup))
        return {"warmup_steps": warmup, **user_options, "cache_ratio_threshold": taus[key]}

    def single(variant, dtype, tname=None):
        """Single-process record(s) of a variant: {trajectory name: record}."""
        key = (variant, dtype, tname if variant == "on" else None)
        if key not in singles:
            trajs = get_trajs(dtype)
            names = [tname] if variant == "on" else traj_names
            opts = options_for(variant, dtype, tname) if variant in ("off", "on") else None
            recs = run(d, single_model(dtype), variant, opts, [trajs[n] for n in names])
            singles[key] = dict(zip(names, recs))
        return singles[key]

    tasks = []  # (framework, layout, variant or None for a skipped layout, trajectory or None)
    for phase in ("exact", "approx"):
        for fw in frameworks.values():
            for layout in layouts:
                if fw.available(layout):
                    if phase == "exact":
                        tasks.append((fw, layout, None, None))
                    continue
                for variant in variants:
                    if (variant == "on") != (phase == "approx"):
                        continue
                    for tname in (traj_names if variant == "on" else [None]):
                        tasks.append((fw, layout, variant, tname))

    broken = None
    for fw, layout, variant, tname in tasks:
        dtype = getattr(torch, args.dtype if layout == "ulysses" else args.ring_dtype)
        base = {"framework": fw.name, "layout": layout, "dtype": str(dtype).replace("torch.", ""),
                "degrees": dict(zip(("ulysses", "ring"), LAYOUTS[layout](d.world)))}
        if variant is None:
            why = fw.available(layout)
            rows.append({**base, "variant": "-", "trajectory": "-", "status": f"skipped: {why}"})
            log(d, f"skip {fw.name}/{layout}: {why}")
            continue
        names = [tname] if tname else traj_names
        if broken:
            rows.append({**base, "variant": variant, "trajectory": ",".join(names),
                         "status": f"not run: the process group is unusable after {broken}"})
            continue
        label = f"{fw.name}/{layout}/{variant}" + (f"/{tname}" if tname else "")
        log(d, f"run {label}" + (" (hangs until --pg-timeout if the ranks take different branches)"
                                 if variant == "on" else ""))
        model = None
        try:
            ref = single(variant, dtype, tname) if variant == "on" else single(variant, dtype)
            opts = options_for(variant, dtype, tname) if variant in ("off", "on") else None
            model = fw.build(cfg, state, dtype, layout)
            recs = run(d, model, variant, opts, [get_trajs(dtype)[n] for n in names])
            for n, rec in zip(names, recs):
                row = {**base, "variant": variant, "trajectory": n, **compare(d, rec, ref[n])}
                if opts:
                    row["options"] = opts
                row["status"] = verdict(row, variant, tolerance(dtype))
                rows.append(row)
        except Exception as e:
            # A collective that timed out (ranks in different branches) leaves the process group
            # unusable (NCCL aborts the process anyway): the rows after it are not run. Rerun them
            # alone with --frameworks / --parallel / --variants / --trajectories.
            rows.append({**base, "variant": variant, "trajectory": ",".join(names), "status": "ERROR",
                         "error": f"{type(e).__name__}: {e}"})
            broken = label
            if d.rank == 0:
                traceback.print_exc()
            if model is not None and variant in ("off", "on"):
                import fastcache_fx
                taken = [r["approx"] for r in fastcache_fx.stats(model)["trace"]]
                print(f"[rank {d.rank}] {label}: decisions taken before the error {taken}", file=sys.stderr, flush=True)
        write(d, args.out_json, env, rows)
    write(d, args.out_json, env, rows)
    if d.rank == 0:
        print_table(rows)
        print(f"wrote {args.out_json}")
    failed = any(r["status"] != "ok" and not r["status"].startswith("skipped") for r in rows)
    if broken:
        return 1  # no barrier: the other ranks may still wait in the collective that failed here
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
