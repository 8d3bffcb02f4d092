"""Cache state per CFG context: fastcache at each cache level against its peers.

Part 1 (measured, the bundled models): one trajectory per method; the cache state is the bytes of
tensor storage alive after the trajectory that was not alive before it (model weights, inputs and
the sampler's tensors excluded: every ``torch.Tensor`` the garbage collector sees, by storage),
minus the same figure for plain Inductor. For fastcache ``stats()["state_bytes_per_context"]`` is
printed beside it. Both bundled models batch CFG (one context). Peak: a second trajectory runs under
``torch.profiler`` with ``profile_memory=True`` (the CPU allocator reports every allocation and free
to it); the peak of the running sum of its allocations, plus the state already alive, minus the
same for plain Inductor, is the peak-memory increase (the transient buffers of the decision, the
branch outputs and the new state written while the old is alive).

Part 2 (computed, real sizes, no weights): FLUX.1-dev at 1024 px (4096 image + 512 text tokens,
width 3072, 19 + 38 blocks) and Wan2.1-14B at 720p / 81 frames (21 x 45 x 80 = 75,600 tokens,
width 5120, 40 blocks), bf16. fastcache: the state specs of ``apply_block_cache`` on the real
config traced on the meta device at reduced depth (Flux 2 + 2 blocks, Wan 3; the block level is
scaled by the real depth, a span's state does not depend on depth). Peers: the state their source keeps,
in stream tensors (diffusers 0.42.1 ``FBCSharedBlockState``: head output of every stream, head
residual of the image stream, tail residual of every stream; ``TaylorSeerCacheConfig`` defaults:
max_order + 1 = 2 bf16 factors of each hooked attention output, every block's attention modules;
cache-dit DBCache: Fn residual of the image stream and the cached residual of each stream; with
its order-1 TaylorSeer calibrator 4 tensors per stream, the count part 1 measures on the DiT),
cross-checked against part 1's measured counts.

    python benchmarks/memory.py [--models dit,mmdit] [--samples 4] [--steps 10]

Writes benchmarks/memory.json and prints the tables.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LEVELS = {"fastcache block level (default)": {},
          "fastcache step level": {"cache_level": "step"},
          "fastcache step level + span Taylor-1": {"cache_level": "step", "approx": "taylor"},
          "fastcache span level (2 spans)": {"cache_level": "span"},
          "fastcache block level, bfloat16 state": {"state_dtype": "bfloat16"},
          "fastcache step level + span Taylor-1, bfloat16 state": {"cache_level": "step", "approx": "taylor",
                                                                   "state_dtype": "bfloat16"}}
PEERS = {"FirstBlockCache (diffusers)": ("fbcache", {"threshold": 0.1}),
         "TaylorSeerCache (diffusers)": ("taylorseer", {"cache_interval": 3}),
         "DBCache (cache-dit)": ("dbcache", {"threshold": 0.12}),
         "DBCache + TaylorSeer (cache-dit)": ("dbcache_taylorseer", {"threshold": 0.12})}


def _storages() -> dict[int, int]:
    """{data_ptr: bytes} of every real tensor storage the garbage collector can see."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    out = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type != "meta":
            try:
                st = o.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            if st.data_ptr():
                out[st.data_ptr()] = st.nbytes()
    return out


def _new_bytes(before: dict[int, int]) -> int:
    return sum(n for p, n in _storages().items() if p not in before)


def measure(model_name: str, samples: int, steps: int) -> list[dict]:
    """Part 1: state bytes per context of each method after one trajectory on a bundled model."""
    import compare
    import fastcache_fx
    import peers as P

    a = SimpleNamespace(model=model_name, samples=samples, steps=steps, guidance=None, no_progress=True,
                        repeats=1, peer_mode="eager")
    suite = compare.Suite1(a)
    j = suite.job
    rows = []

    def run(label, make):
        torch._dynamo.reset()
        model = j.load()
        fn, extra = make(model)
        before = _storages()
        imgs = suite.sample(fn, steps=steps, progress=False)
        del imgs
        state = _new_bytes(before)
        peak = _peak_during(lambda: suite.sample(fn, steps=steps, progress=False))
        rows.append({"model": model_name, "method": label, "state_bytes": state, "transient_peak_bytes": peak,
                     **extra(model)})
        print(f"{model_name:6s} {label:40s} {state / 1e3:10.1f} kB state, {peak / 1e3:10.1f} kB transient peak",
              flush=True)

    run("Inductor", lambda m: (j.inductor(m), lambda _: {}))
    for label, opts in LEVELS.items():
        run(label, lambda m, o=opts: (j.fastcache(m, {"decision": "output", **o}),
                                      lambda mm: {"stats_bytes_per_context": max(
                                          fastcache_fx.stats(mm)["state_bytes_per_context"].values(), default=0)}))
    for label, (name, params) in PEERS.items():
        def make(m, name=name, params=params):
            applied = P.apply_peer(name, m, steps=steps, params=params)
            return suite.peer_callee(applied, m), lambda _: {}
        try:
            run(label, make)
        except Exception as e:  # a peer that cannot run on this model is a row with its reason
            rows.append({"model": model_name, "method": label, "state_bytes": None,
                         "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
    base, base_peak = rows[0]["state_bytes"], rows[0]["transient_peak_bytes"]
    stream = _stream_bytes(j, samples)
    for r in rows:
        if r["state_bytes"] is not None:
            r["over_inductor_bytes"] = r["state_bytes"] - base
            r["image_stream_tensors"] = r["over_inductor_bytes"] / stream
            r["peak_over_inductor_bytes"] = r["over_inductor_bytes"] + r["transient_peak_bytes"] - base_peak
            r["peak_image_stream_tensors"] = r["peak_over_inductor_bytes"] / stream
    return rows


def _peak_during(fn) -> int:
    """Bytes: the peak of the running sum of the CPU allocations and frees made while ``fn()``
    runs, relative to its start: the profiler's raw "[memory]" records (Kineto results; the
    ``events()`` list folds them into the ops that made them), in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    total = peak = 0
    for _, n in records:
        total += n
        peak = max(peak, total)
    return peak


def _stream_bytes(j, samples: int) -> int:
    """Bytes of one image-stream tensor [2 samples (CFG), N, D] float32 of the job's transformer."""
    m = j.load()
    cfg = m.config
    side = cfg.sample_size // cfg.patch_size
    width = cfg.num_attention_heads * cfg.attention_head_dim
    return 2 * samples * side * side * width * 4


# ----------------------------------------------------------------------------- part 2


def _trace_meta(model, kwargs):
    cap = {}

    def backend(gm, example_inputs, **_):
        cap["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(**kwargs, return_dict=False)
    return cap["gm"]


def _flux():
    from diffusers import FluxTransformer2DModel

    bf = torch.bfloat16
    with torch.device("meta"):
        m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(bf)
        kw = dict(hidden_states=torch.empty(1, 4096, 64, dtype=bf), encoder_hidden_states=torch.empty(1, 512, 4096, dtype=bf),
                  pooled_projections=torch.empty(1, 768, dtype=bf), timestep=torch.empty(1, dtype=bf),
                  img_ids=torch.empty(4096, 3), txt_ids=torch.empty(512, 3), guidance=torch.empty(1, dtype=bf))
    return m, kw, {"transformer_blocks": 19, "single_transformer_blocks": 38}, (4096, 512, 3072)


def _wan():
    from diffusers import WanTransformer3DModel

    bf = torch.bfloat16
    with torch.device("meta"):
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=3,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).to(bf)
        kw = dict(hidden_states=torch.empty(1, 16, 21, 90, 160, dtype=bf),
                  encoder_hidden_states=torch.empty(1, 512, 4096, dtype=bf), timestep=torch.empty(1, dtype=bf))
    return m, kw, {"blocks": 40}, (75600, 512, 5120)


def real_sizes() -> list[dict]:
    """Part 2: state per context at real sizes, bf16 (see the module docstring)."""
    from fastcache_fx.config import FastCacheConfig
    from fastcache_fx.passes.block_cache import apply_block_cache

    rows = []
    for name, build in (("FLUX.1-dev 1024px", _flux), ("Wan2.1-14B 720p 81 frames", _wan)):
        model, kw, depth, (n_img, n_txt, width) = build()
        gm = _trace_meta(model, kw)
        img, txt = n_img * width * 2, n_txt * width * 2  # bytes of one bf16 stream tensor
        joint = name.startswith("FLUX")
        blocks = sum(depth.values())
        for label, opts in LEVELS.items():
            _, res = apply_block_cache(gm, FastCacheConfig(**opts))
            per: dict[str, int] = {}
            for s in res.contract.state:
                owner = next((b for b in res.blocks if s.name.startswith(b + ".")), "")
                per[owner] = per.get(owner, 0) + torch.Size(s.shape).numel() * torch.empty((), dtype=s.dtype).element_size()
            if res.level == "block":  # traced at 2 blocks per list: scale each list to its real depth
                total = per.get("", 0) + sum(
                    n / sum(1 for b in res.blocks if b.startswith(lst + ".")) * sum(
                        v for b, v in per.items() if b.startswith(lst + ".")) for lst, n in depth.items())
            else:
                total = sum(per.values())
            rows.append({"model": name, "method": label, "state_bytes": int(total)})
        # peers, from the state their source keeps (module docstring)
        streams = img + txt if joint else img
        rows.append({"model": name, "method": "FirstBlockCache (diffusers)", "state_bytes": streams + img + streams})
        attn_out = (img + txt) if joint else 2 * img  # Flux: one attention per block; Wan: attn1 + attn2
        rows.append({"model": name, "method": "TaylorSeerCache (diffusers)", "state_bytes": blocks * 2 * attn_out})
        rows.append({"model": name, "method": "DBCache (cache-dit)", "state_bytes": img + streams})
        rows.append({"model": name, "method": "DBCache + TaylorSeer (cache-dit)", "state_bytes": img + 4 * streams})
        fb = next(r["state_bytes"] for r in rows if r["model"] == name and r["method"].startswith("FirstBlockCache"))
        for r in rows:
            if r["model"] == name:
                r["x_firstblockcache"] = r["state_bytes"] / fb
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="dit,mmdit")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "memory.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    measured = [r for m in a.models.split(",") if m for r in measure(m, a.samples, a.steps)]
    real = real_sizes()
    print("\n| model | method | state / context | over Inductor | image-stream tensors | peak over Inductor "
          "| image-stream tensors |\n|---|---|---|---|---|---|---|")
    for r in measured:
        if r["state_bytes"] is None:
            print(f"| {r['model']} | {r['method']} | n/a: {r['reason']} | | |")
            continue
        print(f"| {r['model']} | {r['method']} | {r['state_bytes'] / 1e6:.2f} MB | {r['over_inductor_bytes'] / 1e6:.2f} MB "
              f"| {r['image_stream_tensors']:.1f} | {r['peak_over_inductor_bytes'] / 1e6:.2f} MB "
              f"| {r['peak_image_stream_tensors']:.1f} |")
    print("\n| model (bf16) | method | state / context | x FirstBlockCache |\n|---|---|---|---|")
    for r in real:
        print(f"| {r['model']} | {r['method']} | {r['state_bytes'] / 1e9:.2f} GB | {r['x_firstblockcache']:.2f} |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    a.out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "commit": commit,
                                 "command": "python benchmarks/memory.py " + " ".join(argv or sys.argv[1:]),
                                 "measured": measured, "real_sizes": real}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
