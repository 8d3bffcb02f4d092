"""Ridge calibration of the linear block maps (offline)."""

import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.runtime.calibration import RidgeStats, calibrate, load_calibration


def test_ridge_recovers_known_map_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 5, generator=g), torch.randn(6, generator=g)
    x = torch.randn(4000, 5, generator=g)
    y = x @ w.T + b + 1e-4 * torch.randn(4000, 6, generator=g)
    st = RidgeStats(5, 6)
    st.add(x, y)
    wf, bf, err = st.fit(ridge=1e-6)
    assert torch.allclose(wf, w, atol=1e-3) and torch.allclose(bf, b, atol=1e-3) and err < 1e-3
    chunked = RidgeStats(5, 6)
    for i in range(0, 4000, 512):
        chunked.add(x[i:i + 512], y[i:i + 512])
    assert torch.allclose(chunked.fit(1e-6)[0], wf, atol=1e-6)


def _capture(model, kw):
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1])(**kw)
    return find_blocks(graphs[0]).regions


def _run_fn(kw):
    def run(m):
        for t in (900, 700, 500):
            m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})
    return run


def test_calibrate_save_load_and_refusals(tmp_path):
    model, kw = zoo.build("dit")
    path = tmp_path / "calib.safetensors"
    cal = calibrate(model, _run_fn(kw), out=path)
    assert set(cal.metadata["samples"]) == {"transformer_blocks.0.0", "transformer_blocks.1.0"}
    regions = _capture(model, kw)
    w = load_calibration(path, regions, kind="linear")
    assert set(w) == {f"transformer_blocks.{i}.{k}.0" for i in (0, 1) for k in ("weight", "bias")}
    assert w["transformer_blocks.0.weight.0"].shape == (16, 16)
    with pytest.raises(ValueError, match="residual_linear"):
        load_calibration(path, regions, kind="residual_linear")
    sd3, kw_sd3 = zoo.build("sd3")
    with pytest.raises(ValueError, match="width|no map"):
        load_calibration(path, _capture(sd3, kw_sd3), kind="linear")
    with pytest.raises(ValueError, match="model_class"):
        load_calibration(path, regions, kind="linear", model_info_={"model_class": "FluxTransformer2DModel"})


def test_compiled_linear_approximation_uses_the_calibration(tmp_path):
    model, kw = zoo.build("dit")
    path = tmp_path / "calib.safetensors"
    calibrate(model, _run_fn(kw), out=path)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "approx": "linear", "calibration": str(path), "cache_ratio_threshold": 1e6, "warmup_steps": 1,
        "max_consecutive_approx": 100})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "falling back to residual"
        outs = [compiled(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample for t in (900, 800)]
    assert fastcache_fx.stats(model)["trace"][-1]["approx"] == [True, True]
    assert torch.isfinite(outs[1]).all()
    # the linear branch differs from residual reuse (it is not silently the residual rule)
    torch._dynamo.reset()
    fastcache_fx.reset(model)
    res = torch.compile(model, backend="fastcache", dynamic=False, options={
        "cache_ratio_threshold": 1e6, "warmup_steps": 1, "max_consecutive_approx": 100})
    r = [res(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample for t in (900, 800)]
    assert not torch.allclose(r[1], outs[1])
