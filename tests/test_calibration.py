"""Ridge calibration of the linear block maps (offline): statistics, hooks, file, loading, backend."""

import warnings

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo
from fastcache_fx.passes.blocks import find_blocks
from fastcache_fx.calibration import (RidgeStats, calibrate, load, load_calibration, model_info,
                                              stream_pairs)
from fastcache_fx.ops.decision import approx_linear, approx_residual_linear


def _synthetic(n=4000, d_in=5, d_out=6, noise=1e-4):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(d_out, d_in, generator=g), torch.randn(d_out, generator=g)
    x = torch.randn(n, d_in, generator=g) * 3 + 2  # not centred: the intercept matters
    return w, b, x, x @ w.T + b + noise * torch.randn(n, d_out, generator=g)


def test_ridge_recovers_known_map():
    w, b, x, y = _synthetic()
    st = RidgeStats(5, 6)
    st.add(x, y)
    for ridge in (None, 1e-6):  # GCV default and a fixed lambda
        r = st.solve(ridge)
        assert r.weight.shape == (6, 5) and r.bias.shape == (6,)
        assert torch.allclose(r.weight, w, atol=1e-3) and torch.allclose(r.bias, b, atol=1e-3)
        assert r.rel_error < 1e-3
    # the error reported from the statistics equals the error of the returned map
    wf, bf = st.fit()
    direct = float((y - torch.nn.functional.linear(x, wf, bf)).norm() / (y - y.mean(0)).norm())
    assert abs(direct - st.solve().rel_error) < 1e-5
    # a large lambda shrinks the map
    assert st.solve(1e9).weight.norm() < 0.1 * w.norm()


def test_chunked_accumulation_equals_one_shot():
    _, _, x, y = _synthetic()
    once = RidgeStats(5, 6)
    once.add(x, y)
    chunked, other = RidgeStats(5, 6), RidgeStats(5, 6)
    for i in range(0, 2000, 512):
        chunked.add(x[i:min(i + 512, 2000)].reshape(-1, 1, 5), y[i:min(i + 512, 2000)].reshape(-1, 1, 6))
    other.add(x[2000:], y[2000:])
    chunked.merge(other)
    assert chunked.n == once.n
    assert torch.allclose(chunked.xtx, once.xtx, rtol=1e-12) and torch.allclose(chunked.xty, once.xty, rtol=1e-12)
    for a, b in zip(chunked.fit(), once.fit()):
        assert torch.allclose(a, b, atol=1e-6)


def test_stream_pairs_canonical_order():
    img, txt = torch.randn(2, 16, 8), torch.randn(2, 6, 8)
    # joint block: returns (encoder_hidden_states, hidden_states); image stream first
    pairs = stream_pairs({"hidden_states": img, "encoder_hidden_states": txt}, (txt + 1, img + 1))
    assert [p[0] is q for p, q in zip(pairs, (img, txt))] == [True, True]
    # last SD3 block: None for the encoder stream
    assert len(stream_pairs({"hidden_states": img, "encoder_hidden_states": txt}, (None, img + 1))) == 1
    # a tie in shape: the names decide
    a, b = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    pairs = stream_pairs({"hidden_states": a, "encoder_hidden_states": b}, (b + 1, a + 1))
    assert pairs[0][0] is a and torch.equal(pairs[0][1], a + 1) and pairs[1][0] is b


class _Lin(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a = torch.nn.Linear(d, d)

    def forward(self, hidden_states, timestep=None):
        return self.a(hidden_states)


class _Toy(torch.nn.Module):
    """Two exactly linear "blocks": the fits must be exact."""

    def __init__(self, d=8):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_Lin(d), _Lin(d)])

    def forward(self, hidden_states, timestep):
        for blk in self.transformer_blocks:
            hidden_states = blk(hidden_states, timestep=timestep)
        return hidden_states


def test_residual_linear_fits_what_the_runtime_applies():
    toy = _Toy()
    xs = [torch.randn(2, 10, 8) for _ in range(6)]

    def run(m):
        for traj in range(2):  # two trajectories: no pair across the boundary
            for t, x in zip((900, 600, 300), xs[3 * traj:]):
                m(x, torch.tensor([t]))

    cal = calibrate(toy, run, kind="residual_linear", ridge=0.0)
    assert cal.metadata["samples"]["transformer_blocks.0"] == [2 * 2 * 2 * 10]  # 2 pairs/trajectory
    w, b = cal.tensors["transformer_blocks.0.weight.0"], cal.tensors["transformer_blocks.0.bias.0"]
    blk = toy.transformer_blocks[0]
    h_a, h = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    with torch.no_grad():
        res_a = blk(h_a) - h_a
        assert torch.allclose(approx_residual_linear(h, res_a, h_a, w, b), blk(h), atol=1e-4)
        lin = calibrate(toy, run, kind="linear")
        got = approx_linear(h, lin.tensors["transformer_blocks.1.weight.0"], lin.tensors["transformer_blocks.1.bias.0"])
        assert torch.allclose(got, toy.transformer_blocks[1](h), atol=1e-3)


def _capture(model, kw):
    graphs = []
    torch._dynamo.reset()
    torch.compile(model, backend=lambda gm, ex: (graphs.append(gm), gm.forward)[1], dynamic=False)(**kw)
    torch._dynamo.reset()
    return find_blocks(graphs[0]).regions


def _run_fn(kw, ts=(900, 700, 500)):
    def run(m):
        for t in ts:
            m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})
    return run


@pytest.fixture(scope="module")
def dit_calibration(tmp_path_factory):
    torch.manual_seed(0)
    model, kw = zoo.build("dit", num_layers=2)
    path = tmp_path_factory.mktemp("calib") / "calib.safetensors"
    cal = calibrate(model, _run_fn(kw), out=path)
    return model, kw, path, cal


def test_calibrate_writes_file_with_metadata(dit_calibration):
    model, kw, path, cal = dit_calibration
    f = load(path)
    assert set(f.tensors) == {f"transformer_blocks.{i}.{k}.0" for i in (0, 1) for k in ("weight", "bias")}
    assert all(v.dtype == torch.float32 for v in f.tensors.values())
    m = f.metadata
    assert m["kind"] == "linear" and m["model_class"] == "DiTTransformer2DModel"
    assert m["config_hash"] == model_info(model)["config_hash"] and len(m["config_hash"]) == 64
    assert m["streams"]["transformer_blocks.0"] == [{"tokens": 16, "width": 16}]
    assert m["samples"]["transformer_blocks.1"] == [3 * 2 * 16]  # 3 calls x batch 2 x 16 tokens
    assert all(0 <= e[0] < 1 for e in m["fit_error"].values())
    # hooks are gone
    assert not any(b._forward_hooks for b in model.transformer_blocks)


def test_load_calibration_matches_graph_regions_and_refuses(dit_calibration, tmp_path):
    model, kw, path, _ = dit_calibration
    regions = _capture(model, kw)
    assert [r.name for r in regions] == ["transformer_blocks.0", "transformer_blocks.1"]
    w = load_calibration(path, regions, kind="linear")
    assert set(w) == {f"transformer_blocks.{i}.{k}.0" for i in (0, 1) for k in ("weight", "bias")}
    assert w["transformer_blocks.0.weight.0"].shape == (16, 16) and w["transformer_blocks.1.bias.0"].shape == (16,)
    with pytest.raises(ValueError, match="residual_linear"):
        load_calibration(path, regions, kind="residual_linear")
    with pytest.raises(ValueError, match="model_class"):
        load_calibration(path, regions, kind="linear", model_info={"model_class": "FluxTransformer2DModel"})
    with pytest.raises(ValueError, match="config_hash"):
        load_calibration(path, regions, kind="linear", model_info={**model_info(model), "config_hash": "0" * 64})
    assert load_calibration(path, regions, kind="linear", model_info=model_info(model)).keys() == w.keys()
    # a block the file does not have
    deeper, kw3 = zoo.build("dit", num_layers=3)
    with pytest.raises(ValueError, match="no map for block transformer_blocks.2"):
        load_calibration(path, _capture(deeper, kw3), kind="linear")
    # another width: a DiT with 3 heads (width 24)
    from diffusers import DiTTransformer2DModel

    wide = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=3, num_embeds_ada_norm=10).eval()
    with pytest.raises(ValueError, match="width 16 in file, model has 24"):
        load_calibration(path, _capture(wide, kw), kind="linear")
    with pytest.raises(FileNotFoundError):
        load_calibration(tmp_path / "missing.safetensors", regions, kind="linear")


def test_joint_blocks_map_canonical_streams_to_graph_order(tmp_path):
    """Flux: joint and single blocks have an image (16 tokens) and a text (6 tokens) stream, in
    graph order (txt, img) for some; the last single block's text output is not a stream."""
    model, kw = zoo.build("flux")
    path = tmp_path / "flux.safetensors"
    cal = calibrate(model, _run_fn(kw, ts=(0.9, 0.5)), out=path)
    assert cal.metadata["streams"]["single_transformer_blocks.0"] == [{"tokens": 16, "width": 16},
                                                                      {"tokens": 6, "width": 16}]
    regions = _capture(model, kw)
    w = load_calibration(path, regions, kind="linear")
    for r in regions:
        for s, shape in enumerate(r.stream_shapes):
            canon = 0 if shape[1] == 16 else 1
            assert torch.equal(w[f"{r.name}.weight.{s}"], cal.tensors[f"{r.name}.weight.{canon}"]), (r.name, s)
    assert len(regions[-1].stream_shapes) == 1 and f"{regions[-1].name}.weight.1" not in w


def test_compiled_linear_approximation_uses_the_calibration(dit_calibration):
    model, kw, path, cal = dit_calibration
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "approx": "linear", "calibration": str(path), "cache_ratio_threshold": 1e6, "warmup_steps": 1,
        "max_consecutive_approx": 100})
    ts = (900, 800, 700)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            outs = [compiled(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample for t in ts]
    assert not [w for w in caught if "falling back" in str(w.message)]
    trace = fastcache_fx.stats(model)["trace"]
    assert trace[0]["approx"] == [False, False]
    assert trace[1]["approx"] == [True, True] and trace[2]["approx"] == [True, True]
    assert all(torch.isfinite(o).all() for o in outs)

    # eager reference: every block replaced by approx_linear with the fitted map
    def replace(name):
        return lambda mod, args, kwargs, out: approx_linear(args[0], cal.tensors[f"{name}.weight.0"],
                                                            cal.tensors[f"{name}.bias.0"])
    handles = [b.register_forward_hook(replace(f"transformer_blocks.{i}"), with_kwargs=True)
               for i, b in enumerate(model.transformer_blocks)]
    try:
        with torch.no_grad():
            ref = model(**{**kw, "timestep": torch.full_like(kw["timestep"], ts[2])}).sample
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(outs[2], ref, atol=1e-4, rtol=1e-4)
    fastcache_fx.reset(model)
    torch._dynamo.reset()


def test_cli_refuses_bad_arguments(tmp_path):
    from fastcache_fx.cli import main

    assert main(["calibrate", "--samples", "0", "--out", str(tmp_path / "c.safetensors")]) == 2
    assert main(["calibrate", "--rank", "0", "--out", str(tmp_path / "c.safetensors")]) == 2


def test_cli_calibrates_reference(tmp_path, monkeypatch):
    from fastcache_fx import reference
    from fastcache_fx.cli import main

    small = reference.build_dit({**reference.DIT_CONFIG, "num_layers": 2}).eval()
    monkeypatch.setattr(reference, "load", lambda *a, **k: small)  # the CLI runs the same code path
    out = tmp_path / "c.safetensors"
    assert main(["calibrate", "--samples", "3", "--batch", "2", "--steps", "2", "--out", str(out), "--no-progress",
                 "--rank", "8", "--time-buckets", "2"]) == 0
    m = load(out).metadata
    assert m["samples"]["transformer_blocks.1"] == [3 * 2 * 2 * 64]  # 3 samples x CFG x 2 steps x 64 tokens
    assert (m["width"], m["rank"], m["buckets"]) == (small.config.num_attention_heads * small.config.attention_head_dim, 8, 2)
    assert m["bucket_samples"]["transformer_blocks.1"] == [[3 * 2 * 64, 3 * 2 * 64]]  # 2 steps: t ~ 999 and ~ 499
    assert len(m["fit_error"]["transformer_blocks.0"]) == 1

    def missing(*a, **k):
        raise FileNotFoundError("reference model record dit.json is missing")
    monkeypatch.setattr(reference, "load", missing)
    assert main(["calibrate", "--out", str(out)]) == 2


def test_underdetermined_fit_degrades_to_residual_reuse():
    """n < D: the ridge fit is shrunk toward W = I (residual reuse), not toward W = 0."""
    g = torch.Generator().manual_seed(1)
    d, n = 64, 20
    mean_res = torch.randn(d, generator=g)
    a = torch.randn(d, d, generator=g) * 0.3 / d ** 0.5

    def data(k):
        x = torch.randn(k, d, generator=g) * 2 + 1
        return x, x + mean_res + x @ a.T + 0.3 * torch.randn(k, d, generator=g)

    x, y = data(n)
    st = RidgeStats(d, d)
    st.add(x, y)
    xt, yt = data(500)
    reuse = xt + (y - x).mean(0)  # what residual reuse with the mean residual predicts
    w, b = st.fit(identity=True)
    pred = torch.nn.functional.linear(xt, w, b)
    assert (pred - reuse).norm() < 0.1 * reuse.norm()
    assert (pred - yt).norm() <= 1.02 * (reuse - yt).norm()  # never much worse than residual reuse
    w0, b0 = st.fit()  # the plain ridge (prior W = 0) is garbage here
    assert (torch.nn.functional.linear(xt, w0, b0) - yt).norm() > 2 * (pred - yt).norm()
    # with plenty of samples both priors reach the same map
    xb, yb = data(5000)
    big = RidgeStats(d, d)
    big.add(xb, yb)
    assert torch.allclose(big.fit(identity=True)[0], big.fit(ridge=1e-6)[0], atol=2e-2)


def test_low_rank_error_falls_as_rank_grows():
    g = torch.Generator().manual_seed(2)
    d = 32
    c = torch.randn(d, d, generator=g) @ torch.diag(torch.logspace(0, -2, d)) @ torch.randn(d, d, generator=g) / d
    x = torch.randn(3000, d, generator=g)
    y = x + x @ c.T + 0.01 * torch.randn(3000, d, generator=g)
    st = RidgeStats(d, d)
    st.add(x, y)
    errs = []
    for r in (1, 4, 16, 32):
        fit = st.solve(identity=True, rank=r)
        assert fit.u.shape == (d, r) and fit.v.shape == (d, r)
        # the factors and the full weight describe the same map: W = I + U V^T
        assert torch.allclose(fit.weight, torch.eye(d) + fit.u @ fit.v.T, atol=1e-5)
        direct = torch.nn.functional.linear(x, fit.weight, fit.bias)
        assert abs(float((y - direct).norm() / (y - y.mean(0)).norm()) - fit.rel_error) < 1e-4
        errs.append(fit.rel_error)
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert abs(errs[-1] - st.solve(identity=True).rel_error) < 1e-6
    with pytest.raises(ValueError, match="rank"):
        st.solve(rank=0)


class _TimeLin(torch.nn.Module):
    """A block whose map flips sign with the timestep (as AdaLN makes blocks time-dependent)."""

    def __init__(self, d):
        super().__init__()
        self.a = torch.nn.Linear(d, d)

    def forward(self, hidden_states, timestep=None):
        sign = 1.0 if float(timestep.reshape(-1)[0]) >= 500 else -1.0
        return sign * self.a(hidden_states)


class _TimeToy(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_TimeLin(d)])

    def forward(self, hidden_states, timestep):
        return self.transformer_blocks[0](hidden_states, timestep=timestep)


def test_time_buckets_fit_one_map_per_timestep_range(tmp_path):
    toy = _TimeToy()
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 20, 8, generator=g) for _ in range(4)]

    def run(m):
        for t, x in zip((900, 700, 300, 100), xs):
            m(x, torch.tensor([t]))

    cal = calibrate(toy, run, out=tmp_path / "k2.safetensors", time_buckets=2)
    m = cal.metadata
    assert m["buckets"] == 2 and m["rank"] is None and m["width"] == 8
    assert m["bucket_samples"]["transformer_blocks.0"] == [[80, 80]]
    w, b = cal.tensors["transformer_blocks.0.weight.0"], cal.tensors["transformer_blocks.0.bias.0"]
    assert w.shape == (2, 8, 8) and b.shape == (2, 8)
    blk, h = toy.transformer_blocks[0], torch.randn(1, 5, 8)
    with torch.no_grad():
        for k, t in ((0, 200), (1, 800)):  # bucket 0: t/1000 < 0.5
            assert torch.allclose(approx_linear(h, w[k], b[k]), blk(h, torch.tensor([t])), atol=1e-3)
        one = calibrate(toy, run)  # one bucket cannot represent both signs
        assert one.metadata["fit_error"]["transformer_blocks.0"][0] > 0.5 > 1e-3 > m["fit_error"]["transformer_blocks.0"][0]
    # low rank + buckets: u, v [K, D, r]
    low = calibrate(toy, run, rank=3, time_buckets=2)
    assert low.tensors["transformer_blocks.0.u.0"].shape == (2, 8, 3) and "transformer_blocks.0.weight.0" not in low.tensors


def test_refusals_name_rank_and_buckets(dit_calibration, tmp_path):
    model, kw, path, _ = dit_calibration
    regions = _capture(model, kw)
    with pytest.raises(ValueError, match=r"rank=None, the config asks for rank=16"):
        load_calibration(path, regions, kind="linear", rank=16)
    with pytest.raises(ValueError, match="time_buckets=1, the config asks for time_buckets=4"):
        load_calibration(path, regions, kind="linear", time_buckets=4)
    with pytest.raises(ValueError, match="another model"):
        load_calibration(path, regions, kind="linear", model_info={"model_class": "FluxTransformer2DModel"})
    low = tmp_path / "r4.safetensors"
    calibrate(model, _run_fn(kw), out=low, rank=4)
    w = load_calibration(low, regions, kind="linear", rank=4)
    assert w["transformer_blocks.0.u.0"].shape == (16, 4) and w["transformer_blocks.0.v.0"].shape == (16, 4)
    with pytest.raises(ValueError, match="rank=4, the config asks for rank=None"):
        load_calibration(low, regions, kind="linear")


@pytest.mark.parametrize("decision", ["chi2", "error"])
def test_compiled_residual_linear_from_a_file(tmp_path, decision):
    """approx="residual_linear" with a calibration file (full rank, one time bucket) failed to
    compile (its approximation read a timestep operand the graph did not pass). Under the
    error rule it approximates once it has measured; under chi2 step 1 is approximated: every
    block returns H + R_anchor + C (H - H_anchor) + b with the step-0 anchors, checked against
    eager blocks replaced by that formula."""
    torch.manual_seed(0)
    model, kw = zoo.build("dit", num_layers=2)
    path = tmp_path / "rl.safetensors"
    cal = calibrate(model, _run_fn(kw), out=path, kind="residual_linear")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fastcache", dynamic=False, options={
        "approx": "residual_linear", "calibration": str(path), "decision": decision,
        ("cache_ratio_threshold" if decision == "chi2" else "error_budget"): 1e6, "warmup_steps": 1,
        "max_consecutive_approx": 100})
    step = lambda m, t: m(**{**kw, "timestep": torch.full_like(kw["timestep"], t)}).sample  # noqa: E731
    if decision == "error":
        with torch.no_grad():
            outs = [step(compiled, t) for t in (900, 800, 700, 600)]
        assert fastcache_fx.stats(model)["block_approx_ratio"] > 0 and all(torch.isfinite(o).all() for o in outs)
        fastcache_fx.reset(model)
        return
    anchors = {}

    def record(name):
        def hook(mod, args, kwargs, out):
            anchors[name] = (args[0].clone(), (out - args[0]).clone())
        return hook

    handles = [b.register_forward_hook(record(f"transformer_blocks.{i}"), with_kwargs=True)
               for i, b in enumerate(model.transformer_blocks)]
    with torch.no_grad():
        step(model, 900)
    for h in handles:
        h.remove()
    with torch.no_grad():
        step(compiled, 900)
        out = step(compiled, 800)
    assert fastcache_fx.stats(model)["trace"][1]["approx"] == [True, True]

    def replace(name):
        h0, r0 = anchors[name]
        return lambda mod, args, kwargs, o: approx_residual_linear(args[0], r0, h0, cal.tensors[f"{name}.weight.0"],
                                                                   cal.tensors[f"{name}.bias.0"])
    handles = [b.register_forward_hook(replace(f"transformer_blocks.{i}"), with_kwargs=True)
               for i, b in enumerate(model.transformer_blocks)]
    try:
        with torch.no_grad():
            ref = step(model, 800)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    fastcache_fx.reset(model)
    torch._dynamo.reset()
