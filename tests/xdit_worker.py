"""Worker of the xDiT tests: ``python tests/xdit_worker.py LAYOUT OUT.pt [TEXT_TOKENS]``.

The checks of ``cp_worker.py`` with xDiT (xfuser 0.7) instead of diffusers' context parallelism:
W gloo processes on this CPU, each builds the tiny Flux of ``zoo.build("flux", batch=1)`` as
xDiT's sequence-parallel wrapper (``xFuserFlux1Transformer2DWrapper``, what xDiT's own runner
uses for Ulysses/ring: ``xfuser/model_executor/models/runner_models/flux.py``) with the same
weights, sets xDiT up the way the runner does and compiles it with ``backend="fastcache"``;
rank 0 also runs the plain diffusers model in one process (also fastcache) as the reference.
Both run ``cp_worker.trajectories``: approximation off (decisions forced full), then live
decisions on a trajectory where at step 4 only the last rank's shard of the image tokens changes.

LAYOUT: ``ulysses`` (Ulysses 2), ``ring`` (ring 2), ``ulysses2xring2`` (4 processes, a
Ulysses x ring mesh). TEXT_TOKENS (default 6, divisible by the degree): a count not divisible
by the sequence-parallel degree makes xDiT replicate the text on every rank (docs/multi-device.md); the tests do not use it.

xfuser 0.7 assumes an accelerator in a few import-time checks. The shims below let its
sequence-parallel path run on CPU/gloo; they belong to this test and to `benchmarks/multi_gpu_check.py --cpu`
(which imports them from here; the library patches
nothing), see docs/xdit_cpu_findings.md. Line numbers are xfuser 0.7.0's.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
LAYOUTS = {"ulysses": (2, 1), "ring": (1, 2), "ulysses2xring2": (2, 2)}  # (ulysses, ring) degrees
PG_TIMEOUT = datetime.timedelta(seconds=240)  # a rank stuck in a collective fails after this


def import_xfuser_on_cpu(ring: bool):
    """Import xfuser with the CPU shims applied (must be this process's first import of it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        # xfuser/core/sparge_attention/block_mask.py:19 imports triton unconditionally (reached
        # from core/distributed/attention_backend.py:16 via sparge.py:7 at `import xfuser`);
        # the CPU torch wheel has no triton. Stand-in for that module (sparge attention only).
        stub = types.ModuleType("xfuser.core.sparge_attention.block_mask")

        def get_block_map_meansim(*args, **kwargs):
            raise RuntimeError("sparge attention needs triton")

        stub.get_block_map_meansim = get_block_map_meansim
        sys.modules[stub.__name__] = stub
    # The next two patches must be in place before xfuser/__init__.py runs: load xfuser.envs under
    # a stub parent package, patch it, then import the real package (xfuser.envs stays patched).
    spec = importlib.util.find_spec("xfuser")
    parent = types.ModuleType("xfuser")
    parent.__path__ = list(spec.submodule_search_locations)
    sys.modules["xfuser"] = parent
    import xfuser.envs as envs

    # xfuser/envs.py:138 raises NotImplementedError("No Accelerators ...") without a GPU/NPU; it is
    # reached at import by xfuser/config/config.py:11 (`from xfuser.envs import CUDA_VERSION`).
    envs.get_device_version = lambda: None  # CUDA_VERSION reads 0.0 (only check_env compares it)
    # xfuser/envs.py:355-356: check_long_ctx_attn() is False unless torch.cuda.is_available(), so
    # initialize_model_parallel silently sets Ulysses/ring degrees to 1
    # (core/distributed/group_coordinator.py:1085-1087) and create_config raises "yunchang not
    # found" (config/config.py:158-159). yunchang's process groups work on gloo.
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    del sys.modules["xfuser"]
    import xfuser
    import yunchang.globals
    import xfuser.model_executor.layers.usp as usp

    # xfuser/model_executor/layers/usp.py:10-13: PROCESS_GROUP is None unless
    # torch.cuda.is_available() (AttributeError 'NoneType' ... 'ULYSSES_PG' at usp.py:126).
    usp.PROCESS_GROUP = yunchang.globals.PROCESS_GROUP
    if ring:
        from xfuser.core.distributed.attention_backend import ATTENTION_FUNCTION_REGISTRY, AttentionBackendType

        # Ring attention needs an attention function that returns the log-sum-exp. On CPU, SDPA is
        # refused for ring (core/distributed/runtime_state.py:271) and SDPA_FLASH calls
        # aten._scaled_dot_product_flash_attention, which has no CPU kernel
        # (core/distributed/attention_backend.py:808-813). Register torch's CPU flash kernel,
        # which returns (out, lse), as SDPA_FLASH.
        def cpu_flash(query, key, value, dropout_p, is_causal, attention_kwargs=None):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p=dropout_p, is_causal=is_causal)
            return out, lse

        ATTENTION_FUNCTION_REGISTRY[AttentionBackendType.SDPA_FLASH] = cpu_flash
    return xfuser


def build(text_tokens: int):
    """(reference diffusers Flux, kwargs, timesteps): ``cp_worker.build("flux")``, with another
    text length if asked."""
    from cp_worker import build as cp_build

    model, kw, ts = cp_build("flux")
    if text_tokens != kw["encoder_hidden_states"].shape[1]:
        g = torch.Generator().manual_seed(1)
        kw = dict(kw, encoder_hidden_states=torch.randn(1, text_tokens, 12, generator=g),
                  txt_ids=torch.zeros(text_tokens, 3))
    return model, kw, ts


def group_info(names, get_sp_group, PROCESS_GROUP) -> list[dict]:
    """For each group name of the graph's collectives: its ranks and which xDiT group it is."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    known = {}
    for label, pg in (("ulysses", PROCESS_GROUP.ULYSSES_PG), ("ring", PROCESS_GROUP.RING_PG),
                      ("sp", get_sp_group().device_group)):
        known.setdefault(pg.group_name, []).append(label)
    out = []
    for name in names:
        pg = _resolve_process_group(name)
        out.append({"name": name, "ranks": dist.get_process_group_ranks(pg), "is": known.get(name, ["?"])})
    return out


def worker(rank: int, world: int, layout: str, path: str, text_tokens: int) -> None:
    sys.path.insert(0, HERE)
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    ulysses, ring = LAYOUTS[layout]
    import_xfuser_on_cpu(ring > 1)
    # xfuser and yunchang create their groups with new_group(timeout=None): torch's default (30 min
    # on gloo). Lower it and initialise WORLD ourselves (xfuser then reuses it), so that ranks
    # disagreeing on a branch fail within PG_TIMEOUT instead of waiting half an hour.
    distributed_c10d.default_pg_timeout = PG_TIMEOUT
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=PG_TIMEOUT)
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import get_sp_group, init_distributed_environment, initialize_model_parallel
    from xfuser.core.distributed.runtime_state import get_runtime_state, initialize_runtime_state
    from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper
    from yunchang.globals import PROCESS_GROUP

    import fastcache_fx
    from cp_worker import trajectories
    from fastcache_fx.runtime import registry

    # what xfuser's runner does for Flux with pipefusion degree 1 (runner_models/flux.py:104-118,
    # via xFuserArgs.create_config and the pipeline's set_input_parameters)
    init_distributed_environment(rank=rank, world_size=world, backend="gloo")  # backend given: envs.py:153 needs a GPU
    initialize_model_parallel(sequence_parallel_degree=ulysses * ring, ulysses_degree=ulysses, ring_degree=ring,
                              backend="gloo")
    engine_config, _ = xFuserArgs(model="tiny-flux", ulysses_degree=ulysses, ring_degree=ring,
                                  attention_backend="SDPA_FLASH" if ring > 1 else None).create_config()
    ref, kw, ts = build(text_tokens)
    model = xFuserFlux1Transformer2DWrapper(**{k: v for k, v in ref.config.items() if not k.startswith("_")})
    model.load_state_dict(ref.state_dict())
    model.eval().requires_grad_(False)

    class FluxPipelineStub:  # what DiTRuntimeState reads from a pipeline (its class name starts with "Flux")
        transformer = model
        vae_scale_factor = 8

    initialize_runtime_state(FluxPipelineStub(), engine_config)
    side = int(kw["hidden_states"].shape[1] ** 0.5)  # square latent, patch 1, Flux's 2x2 packing, VAE 8
    get_runtime_state().set_input_parameters(height=side * 16, width=side * 16, batch_size=1, num_inference_steps=len(ts),
                                             max_condition_sequence_length=text_tokens)

    opts = {"cache_ratio_threshold": 0.05, "warmup_steps": 2, "max_consecutive_approx": 3}
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(**opts))
    res = {"sp": trajectories(model, compiled, kw, ts)}
    res["sp"]["groups"] = [group_info(g.layout.groups, get_sp_group, PROCESS_GROUP)
                           for g in registry.lookup(model).graphs]
    res["sp"]["split_text"] = get_runtime_state().split_text_embed_in_sp
    res["xfuser"] = importlib.metadata.version("xfuser")
    gathered = [None] * world
    dist.all_gather_object(gathered, res["sp"]["on_trace"])
    res["sp"]["traces_of_ranks"] = gathered
    # no collective after this one: the other ranks may leave while rank 0 computes the reference
    # (a barrier here would have to wait that long under PG_TIMEOUT)
    if rank == 0:
        res["single"] = trajectories(ref, torch.compile(ref, backend=fastcache_fx.FastCacheBackend(**opts)), kw, ts)
        torch.save(res, path)
    dist.destroy_process_group()


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = argv or sys.argv[1:]
    layout, path = args[:2]
    text_tokens = int(args[2]) if len(args) > 2 else 6
    ulysses, ring = LAYOUTS[layout]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    mp.spawn(worker, args=(ulysses * ring, layout, path, text_tokens), nprocs=ulysses * ring)


if __name__ == "__main__":
    main()
