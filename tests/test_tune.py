"""fastcache_fx.tune: the speed / PSNR sweep that picks options for a target PSNR."""

import json

import pytest
import torch

import fastcache_fx
from fastcache_fx import zoo


def _run_fn(kw):
    def run(fn):  # a 4-step trajectory with fixed inputs; returns the last output
        out = None
        for t in (900, 700, 500, 300):
            x = kw["hidden_states"] if out is None else kw["hidden_states"] + 0.01 * out
            out = fn(x, timestep=torch.full((2,), t), class_labels=kw["class_labels"]).sample
        return out
    return run


def test_tune_returns_options_and_writes_json(tmp_path):
    model, kw = zoo.build("dit")
    res = fastcache_fx.tune(model, _run_fn(kw), target_psnr=20.0, knob="cache_ratio_threshold",
                            values=[0.05, 5.0], repeats=1, progress=False,
                            options={"warmup_steps": 1}, out_json=tmp_path / "t.json", out_png=tmp_path / "t.png")
    assert [p.value for p in res.points] == [0.05, 5.0]
    # a huge threshold approximates after warmup; a small one on changing inputs less or not at all
    assert res.points[1].approx_ratio > 0 and res.points[1].approx_ratio >= res.points[0].approx_ratio
    ok = [p for p in res.points if p.psnr_db >= 20.0]
    assert res.chosen is not None and res.chosen in ok and res.options == {"warmup_steps": 1,
                                                                           "cache_ratio_threshold": res.chosen.value}
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["knob"] == "cache_ratio_threshold" and len(data["points"]) == 2 and data["options"] == res.options
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_tune_rejects_bad_arguments():
    model, kw = zoo.build("dit")
    for bad in (0, -3.0, float("nan"), "35"):
        with pytest.raises(ValueError, match="target_psnr"):
            fastcache_fx.tune(model, _run_fn(kw), target_psnr=bad)
    with pytest.raises(ValueError, match="knob"):
        fastcache_fx.tune(model, _run_fn(kw), target_psnr=30, knob="tau")
    with pytest.raises(ValueError, match="values"):
        fastcache_fx.tune(model, _run_fn(kw), target_psnr=30, values=[])
    with pytest.raises(ValueError, match="FastCacheConfig.warmup_steps"):
        fastcache_fx.tune(model, _run_fn(kw), target_psnr=30, options={"warmup_steps": -1})
