"""Export (#7): AOTInductor package and split-branch (TensorRT-style) runtime of the cached graph.

The AOTInductor export of the bundled reference DiT and the split runtime are each run over a
whole 50-step DDIM trajectory (2 images, batched CFG = batch 4) and compared step by step with
the in-process backend: same decisions, outputs within 1e-4. The AOTInductor export uses the step
level (one cond: blocks 1-5 as one span) with the span's residual forecast (approx="taylor",
order 2) and the measured-error rule, whose state (residual history, timesteps, error estimates)
lives in the exported buffers; the split runtime the block level with residual reuse and the
chi-square test.
"""

import importlib.util
import json
import shutil

import pytest
import torch

import fastcache_fx
from fastcache_fx import reference
from fastcache_fx.config import FastCacheConfig
from fastcache_fx.deploy.export import EngineFormat

CLASSES = [3, 7]  # 2 images -> batch 4 with CFG
STEPS = 50
CONFIG = FastCacheConfig(cache_ratio_threshold=0.1, warmup_steps=2, max_consecutive_approx=3)
FORECAST = FastCacheConfig(warmup_steps=2, max_consecutive_approx=3, approx="taylor", taylor_order=2,
                           decision="error", error_budget=0.1, cache_level="step")
HAS_TRT = torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None
NO_TRT = "TensorRT engines need CUDA and torch_tensorrt; this machine has " + (
    "no CUDA device" if not torch.cuda.is_available() else "no torch_tensorrt package")


class Recorder:
    """Wraps a transformer callable and keeps every step's output."""

    def __init__(self, fn):
        self.fn, self.outs = fn, []

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.outs.append(out.sample.clone())
        return out


def _example():
    return dict(hidden_states=torch.randn(4, 1, 8, 8), timestep=torch.full((4,), 999, dtype=torch.long),
                class_labels=torch.tensor(CLASSES + [reference.NULL_CLASS] * 2))


@pytest.fixture(scope="module")
def model():
    return reference.load()


def _backend_run(model, config):
    """The in-process backend over one trajectory: (per-step outputs, images, decision trace)."""
    torch._dynamo.reset()
    fastcache_fx.reset(model)
    compiled = torch.compile(model, backend=fastcache_fx.FastCacheBackend(config), dynamic=False)
    rec = Recorder(compiled)
    images = reference.sample(rec, CLASSES, num_inference_steps=STEPS, seed=0)
    trace = fastcache_fx.stats(model)["trace"]
    torch._dynamo.reset()
    return rec.outs, images, [t["approx"] for t in trace]


@pytest.fixture(scope="module")
def backend_run(model):
    return _backend_run(model, CONFIG)


@pytest.fixture(scope="module")
def forecast_run(model):
    return _backend_run(model, FORECAST)


@pytest.fixture(scope="module")
def aoti_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti")
    # the generated C++ wrapper at -O0: its compile is most of this fixture's time on 2 cores
    with torch._inductor.config.patch({"aot_inductor.compile_wrapper_opt_level": "O0"}):
        fastcache_fx.export(model, _example(), out, format="aotinductor", config=FORECAST)
    return out


@pytest.fixture(scope="module")
def split_dir(model, tmp_path_factory):
    """format="tensorrt" with torch.export programs standing in for the TensorRT engines."""
    out = tmp_path_factory.mktemp("split")
    fastcache_fx.export(model, _example(), out, format="tensorrt", config=CONFIG, engine_format=EngineFormat())
    return out


def _compare(loaded, backend_run):
    outs, images, decisions = backend_run
    rec = Recorder(loaded)
    got_images = reference.sample(rec, CLASSES, num_inference_steps=STEPS, seed=0)
    got = [t["approx"] for t in loaded.stats()["trace"]]
    assert len(got) == STEPS and got == decisions
    assert any(any(row) for row in decisions) and not all(all(row) for row in decisions)  # a real mix
    for a, b in zip(rec.outs, outs):
        assert (a - b).abs().max().item() <= 1e-4
    assert (got_images - images).abs().max().item() <= 1e-4


def test_aotinductor_export_matches_backend_over_trajectory(aoti_dir, forecast_run):
    m = json.loads((aoti_dir / "manifest.json").read_text())
    assert m["format"] == "aotinductor" and "model.pt2" in m["files"]
    assert m["blocks"] == ["transformer_blocks.1-5"]
    assert [i["name"] for i in m["inputs"]] == ["hidden_states", "timestep", "class_labels"]
    assert m["controls"] == [{"name": "force", "shape": [1], "dtype": "int8", "fill": -1}]
    assert "transformer_blocks.1-5.res_hist.0.2" in [s["name"] for s in m["state"]]
    _compare(fastcache_fx.load_exported(aoti_dir), forecast_run)


def test_split_runtime_matches_backend_over_trajectory(split_dir, backend_run):
    loaded = fastcache_fx.load_exported(split_dir)
    _compare(loaded, backend_run)
    prog = json.loads((split_dir / "program.json").read_text())
    assert [p["kind"] for p in prog["pieces"]] == ["glue", "block"] * 6 + ["glue"]
    # the runtime really ran the branch the in-graph decision chose
    approx_runs = sum(v["approx"] for v in loaded.branches.values())
    assert approx_runs == sum(sum(t["approx"]) for t in loaded.stats()["trace"])


def test_split_program_with_eager_engines_equals_graph(model):
    """compile_split with a pluggable engine compiler reproduces the rewritten graph exactly."""
    from fastcache_fx.deploy.export import capture, extra_values, rewrite
    from fastcache_fx.lowering.split import compile_split

    cap = capture(model, _example())
    gm, layout, weights, _ = rewrite(cap, CONFIG)
    inputs = list(cap.example_inputs) + extra_values(layout, weights, "cpu")
    names = []
    program = compile_split(gm, inputs, lambda g, ins, name: names.append(name) or g, layout.blocks)
    assert len(names) == 7 + 2 * 6 and "transformer_blocks.0.approx" in names
    nu, ns, no = len(cap.example_inputs), len(layout.state), layout.num_user_outputs
    force = nu + [i for i, s in enumerate(layout.extra_inputs) if s.name == "force"][0]
    ts = cap.roles.index(("input", "timestep"))
    state_pos = [nu + i for i, s in enumerate(layout.extra_inputs) if s in layout.state]
    for f, t in ((0, 999), (1, 900)):  # force full everywhere, then force the approximation
        inputs[force] = torch.full((6,), f, dtype=torch.int8)
        inputs[ts] = torch.full((4,), t)
        want, got = gm(*inputs), program(*inputs)
        assert len(want) == len(got)
        for a, b in zip(want, got):
            assert torch.equal(a, b)
        assert want[-1].tolist() == [bool(f)] * 6
        for pos, new in zip(state_pos, want[no:no + ns]):  # carry the state to the next call
            inputs[pos] = new
    assert program.branches["transformer_blocks.3"] == {"approx": 1, "full": 1}


def test_reset_starts_a_new_trajectory(aoti_dir, model):
    loaded = fastcache_fx.load_exported(aoti_dir)
    kw = _example()
    for t in (999, 980, 960):
        loaded(**{**kw, "timestep": torch.full((4,), t)})
    # identical inputs after warmup: the span (blocks 1-5) sees block 0's output change only with
    # the timestep, and is approximated
    assert loaded.stats()["trace"][-1]["approx"] == [True]
    loaded.reset()
    out = loaded(**{**kw, "timestep": torch.full((4,), 940)})  # still decreasing: only reset() restarts
    last = loaded.stats()["trace"][-1]
    assert last["step"] == 0 and last["approx"] == [False]
    want = model(**{**kw, "timestep": torch.full((4,), 940)}).sample
    assert (out.sample - want).abs().max().item() <= 1e-4 and out[0] is out.sample


def test_shapes_and_dtypes_other_than_the_manifest_are_refused(aoti_dir):
    loaded = fastcache_fx.load_exported(aoti_dir)
    kw = _example()
    with pytest.raises(ValueError, match=r"hidden_states: this export takes shape \[4, 1, 8, 8\]"):
        loaded(**{**kw, "hidden_states": torch.randn(2, 1, 8, 8)})
    with pytest.raises(ValueError, match="timestep: .*torch.int64"):
        loaded(**{**kw, "timestep": torch.full((4,), 999.0)})
    with pytest.raises(ValueError, match="missing argument 'class_labels'"):
        loaded(hidden_states=kw["hidden_states"], timestep=kw["timestep"])


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_corrupted_or_mismatched_manifest_is_refused(split_dir, tmp_path):
    d = _copy(split_dir, tmp_path)
    manifest = d / "manifest.json"
    good = json.loads(manifest.read_text())

    def write(m):
        manifest.write_text(json.dumps(m))

    write({**good, "versions": {**good["versions"], "fastcache_fx": "0.0.1"}})
    with pytest.raises(ValueError, match="exported by fastcache-fx 0.0.1"):
        fastcache_fx.load_exported(d)
    write({k: v for k, v in good.items() if k != "inputs"})
    with pytest.raises(ValueError, match=r"corrupted: missing field\(s\) \['inputs'\]"):
        fastcache_fx.load_exported(d)
    manifest.write_text(json.dumps(good)[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        fastcache_fx.load_exported(d)
    write(good)
    engine = next(f for f in good["files"] if f.endswith(".pt2"))
    (d / engine).write_bytes((d / engine).read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not match its sha256"):
        fastcache_fx.load_exported(d)
    (d / engine).unlink()
    with pytest.raises(ValueError, match="is missing"):
        fastcache_fx.load_exported(d)
    manifest.unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        fastcache_fx.load_exported(d)


def test_export_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="format: expected one of"):
        fastcache_fx.export(model, _example(), tmp_path, format="onnx")
    with pytest.raises(ValueError, match="FastCacheConfig.warmup_steps"):
        fastcache_fx.export(model, _example(), tmp_path, config={"warmup_steps": -1})
    with pytest.raises(ValueError, match="no transformer blocks"):
        fastcache_fx.export(torch.nn.Linear(4, 4), {"input": torch.randn(2, 3, 4)}, tmp_path)
    for field in ("enable_spatial_approx", "enable_token_merge"):  # passes the export cannot carry yet
        with pytest.raises(ValueError, match=f"FastCacheConfig.{field}"):
            fastcache_fx.export(model, _example(), tmp_path, config={field: True})


@pytest.mark.skipif(HAS_TRT, reason="checks the error raised without CUDA/torch_tensorrt")
def test_tensorrt_without_cuda_says_what_is_missing(model, tmp_path):
    from fastcache_fx.cli import main

    with pytest.raises(RuntimeError, match="needs (CUDA|the torch_tensorrt package)"):
        fastcache_fx.export(model, _example(), tmp_path, format="tensorrt")
    with pytest.raises(RuntimeError, match="lowering='tensorrt' needs"):
        torch._dynamo.reset()
        torch.compile(model, backend=fastcache_fx.FastCacheBackend(lowering="tensorrt"), fullgraph=True)(**_example())
    torch._dynamo.reset()
    assert main(["export", "--model", "reference", "--format", "tensorrt", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_backend_and_export_match_inductor(tmp_path):
    model = reference.load().cuda()
    kw = {k: v.cuda() for k, v in _example().items()}
    torch._dynamo.reset()
    trt = torch.compile(model, backend=fastcache_fx.FastCacheBackend(CONFIG, lowering="tensorrt"), dynamic=False)
    want = model(**kw).sample
    assert (trt(**kw).sample - want).abs().max().item() < 1e-2
    fastcache_fx.export(model, kw, tmp_path, format="tensorrt", config=CONFIG)
    loaded = fastcache_fx.load_exported(tmp_path)
    assert (loaded(**kw).sample - want).abs().max().item() < 1e-2


def test_force_control_overrides_decisions_in_the_export(aoti_dir):
    """The step-level export has one decision per step (the span's): forced full, forced
    approximated, then live again."""
    loaded = fastcache_fx.load_exported(aoti_dir)
    kw = _example()
    loaded.controls["force"] = torch.zeros(1, dtype=torch.int8)  # force full computation
    for t in (999, 980, 960, 940):
        loaded(**{**kw, "timestep": torch.full((4,), t)})
    assert [r["approx"] for r in loaded.stats()["trace"]] == [[False]] * 4
    loaded.controls["force"] = torch.ones(1, dtype=torch.int8)
    loaded(**{**kw, "timestep": torch.full((4,), 920)})
    assert loaded.stats()["trace"][-1]["approx"] == [True]
    loaded.controls["force"] = torch.full((1,), -1, dtype=torch.int8)
    loaded(**{**kw, "timestep": torch.full((4,), 900)})
    r = loaded.stats()["trace"][-1]
    assert r["approx"] == [r["delta"][0] <= r["threshold"][0]]


def test_calibrated_linear_maps_travel_in_safetensors(model, tmp_path):
    from safetensors.torch import load_file

    from fastcache_fx.deploy.export import capture, extra_values, rewrite

    kw = _example()
    calib = tmp_path / "calib.safetensors"
    fastcache_fx.calibrate(model, lambda m: [m(**{**kw, "timestep": torch.full((4,), t)}) for t in (900, 600, 300)],
                           out=calib)
    config = CONFIG.replace(approx="linear", calibration=str(calib))
    out = tmp_path / "linear"
    fastcache_fx.export(model, kw, out, format="tensorrt", config=config, engine_format=EngineFormat())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["approx"] == "linear" and "weights.safetensors" in manifest["files"]
    cap = capture(model, kw)
    gm, layout, weights, _ = rewrite(cap, config)
    saved = load_file(str(out / "weights.safetensors"))
    assert set(saved) == set(weights) and all(torch.equal(saved[k], weights[k]) for k in weights)

    # two steps, the second with every block forced onto its linear map: export == rewritten graph
    loaded = fastcache_fx.load_exported(out)
    loaded(**kw)
    loaded.controls["force"] = torch.ones(6, dtype=torch.int8)
    got = loaded(**{**kw, "timestep": torch.full((4,), 900)}).sample
    assert loaded.stats()["trace"][-1]["approx"] == [True] * 6
    nu, no = len(cap.example_inputs), layout.num_user_outputs
    inputs = list(cap.example_inputs) + extra_values(layout, weights, "cpu")
    first = gm(*inputs)
    for pos, new in zip([nu + i for i, s in enumerate(layout.extra_inputs) if s in layout.state],
                        first[no:no + len(layout.state)]):
        inputs[pos] = new
    inputs[nu + [s.name for s in layout.extra_inputs].index("force")] = torch.ones(6, dtype=torch.int8)
    inputs[cap.roles.index(("input", "timestep"))] = torch.full((4,), 900)
    want = gm(*inputs)[0]
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - model(**{**kw, "timestep": torch.full((4,), 900)}).sample).abs().max().item() > 1e-3  # maps used
