import pytest

import fastcache_fx
from fastcache_fx import (CacheLevelConfig, CalibrationConfig, DecisionConfig, FastCacheConfig, Stats, TokenMergeConfig,
                          TokenSelectConfig)
from fastcache_fx.config import budget_for_psnr


@pytest.mark.parametrize("field,value", [
    ("cache_ratio_threshold", 0.0), ("cache_ratio_threshold", float("nan")), ("significance_level", 1.0),
    ("significance_level", 0), ("warmup_steps", -1), ("warmup_steps", 1.5), ("max_consecutive_approx", -2),
    ("approx", "quadratic"), ("reference", "first"), ("adaptive_beta", (1, 2)), ("motion_threshold", -0.1),
    ("enable_block_approx", "yes"), ("lowering", "xla"), ("timestep_max", 0), ("time_buckets", 0), ("rank", 0),
])
def test_bad_value_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        FastCacheConfig(**{field: value})


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="cache_ratio"):
        FastCacheConfig.from_options({"cache_ratio": 0.1})


def test_from_options_and_replace():
    c = FastCacheConfig.from_options({"cache_ratio_threshold": 0.1}, warmup_steps=3)
    assert c.cache_ratio_threshold == 0.1 and c.warmup_steps == 3
    assert c.replace(approx="linear").approx == "linear"
    assert FastCacheConfig.from_options(c) is c
    assert FastCacheConfig(adaptive_beta=[0.1, 0, 0, 0]).adaptive_beta == (0.1, 0.0, 0.0, 0.0)
    assert c.to_dict()["warmup_steps"] == 3


def test_tensorrt_lowering_says_what_is_missing():
    from fastcache_fx.lowering.tensorrt import require_tensorrt

    with pytest.raises(RuntimeError, match="tensorrt"):
        require_tensorrt()


# --- presets, grouped options, conflicts (issue 40) ---------------------------------------------

def test_presets_set_their_options_and_given_options_win():
    assert FastCacheConfig(preset="balanced") == FastCacheConfig()  # today's defaults
    q = FastCacheConfig(preset="quality")
    assert (q.cache_level, q.decision, q.error_budget) == ("block", "output", 0.25)
    f = FastCacheConfig(preset="fast")
    assert (f.cache_level, f.front_blocks, f.approx, f.taylor_order, f.max_consecutive_approx, f.error_budget) == (
        "step", 0, "taylor", 2, 8, 0.5)
    assert FastCacheConfig(preset="fast", error_budget=1.0).error_budget == 1.0
    # a given option that makes a preset option meaningless: the preset's yields
    b = FastCacheConfig(preset="fast", cache_level="block")
    assert b.front_blocks is None and b.approx == "taylor" and b.taylor_order == 2
    c = FastCacheConfig(preset="fast", cache_ratio_threshold=0.1)
    assert c.decision == "chi2" and c.error_budget is None and c.cache_ratio_threshold == 0.1
    t = FastCacheConfig(preset="quality", target_psnr=40)
    assert t.error_budget == pytest.approx(budget_for_psnr(40))
    assert FastCacheConfig.from_options({"preset": "fast"}) == f
    assert f.replace(error_budget=2.0).approx == "taylor"  # the preset stays with the copy
    with pytest.raises(ValueError, match="FastCacheConfig.preset"):
        FastCacheConfig(preset="fastest")


@pytest.mark.parametrize("grouped,flat", [
    (dict(rule=DecisionConfig("chi2", cache_ratio_threshold=0.1, significance_level=0.01, reference="previous")),
     dict(decision="chi2", cache_ratio_threshold=0.1, significance_level=0.01, reference="previous")),
    (dict(rule=DecisionConfig(target_psnr=40)), dict(target_psnr=40)),
    (dict(level=CacheLevelConfig("span", front_blocks=0, back_blocks=1, span_sizes=(2, 3))),
     dict(cache_level="span", front_blocks=0, back_blocks=1, span_sizes=(2, 3))),
    (dict(approx="linear", maps=CalibrationConfig("online", rank=4, time_buckets=2, refit_every=3)),
     dict(approx="linear", calibration="online", rank=4, time_buckets=2, refit_every=3)),
    (dict(token_select=TokenSelectConfig(motion_threshold=0.2, token_buckets=(0.5,))),
     dict(enable_spatial_approx=True, motion_threshold=0.2, token_buckets=(0.5,))),
    (dict(token_merge=TokenMergeConfig(k=3, temporal_weight=0.5, num_stages=2, merge_ratio=0.75, window=2)),
     dict(enable_token_merge=True, token_merge_k=3, token_merge_lambda=0.5, num_stages=2, merge_ratio=0.75,
          token_merge_window=2)),
])
def test_grouped_options_equal_flat_names(grouped, flat):
    g = FastCacheConfig(**grouped)
    assert g == FastCacheConfig(**flat) and hash(g) == hash(FastCacheConfig(**flat))
    assert FastCacheConfig(**g.to_dict()) == g  # a resolved config is a valid given one


def test_groups_check_values_and_clash_with_flat_names():
    with pytest.raises(ValueError, match="CacheLevelConfig.front_blocks"):
        CacheLevelConfig("step", front_blocks=-1)
    with pytest.raises(ValueError, match="DecisionConfig.rule"):
        DecisionConfig("median")
    with pytest.raises(ValueError, match="FastCacheConfig.level and FastCacheConfig.cache_level"):
        FastCacheConfig(level=CacheLevelConfig("step"), cache_level="span")
    with pytest.raises(ValueError, match="FastCacheConfig.level: expected a CacheLevelConfig"):
        FastCacheConfig(level="step")
    assert FastCacheConfig(level=CacheLevelConfig("step"), cache_level="step").cache_level == "step"


@pytest.mark.parametrize("options,a,b", [
    (dict(cache_ratio_threshold=0.1, error_budget=0.2), "error_budget", "cache_ratio_threshold"),
    (dict(decision="output", cache_ratio_threshold=0.1), "cache_ratio_threshold", "decision"),
    (dict(decision="error", adaptive_beta=(0.1, 0, 0, 0)), "adaptive_beta", "decision"),
    (dict(decision="chi2", target_psnr=40), "target_psnr", "decision"),
    (dict(decision="error", target_psnr=40), "target_psnr", "decision"),
    (dict(target_psnr=40, error_budget=0.1), "target_psnr", "error_budget"),
    (dict(adaptive_beta=(0.1, 0, 0, 0), cache_ratio_threshold=0.1), "cache_ratio_threshold", "adaptive_beta"),
    (dict(taylor_order=2), "taylor_order", "approx"),
    (dict(approx="residual", taylor_order=1), "taylor_order", "approx"),
    (dict(rank=4), "rank", "approx"),
    (dict(approx="taylor", time_buckets=2), "time_buckets", "approx"),
    (dict(approx="linear", calibration="c.safetensors", refit_every=4), "refit_every", "calibration"),
    (dict(approx="linear", online_min_samples=8), "online_min_samples", "calibration"),
    (dict(calibration="c.safetensors"), "calibration", "approx"),
    (dict(calibration="online"), "calibration", "approx"),
    (dict(motion_threshold=0.2), "motion_threshold", "enable_spatial_approx"),
    (dict(static_approx="linear"), "static_approx", "enable_spatial_approx"),
    (dict(merge_ratio=0.5), "merge_ratio", "enable_token_merge"),
    (dict(enable_spatial_approx=True, enable_token_merge=True), "enable_spatial_approx", "enable_token_merge"),
    (dict(front_blocks=0), "front_blocks", "cache_level"),
    (dict(cache_level="block", back_blocks=1), "back_blocks", "cache_level"),
    (dict(cache_level="step", num_spans=3), "num_spans", "cache_level"),
    (dict(cache_level="span", num_spans=3, span_sizes=(1, 2)), "num_spans", "span_sizes"),
    (dict(cache_level="step", approx="linear"), "approx", "cache_level"),
    (dict(cache_level="step", enable_token_merge=True), "enable_token_merge", "cache_level"),
    (dict(cache_level="span", enable_spatial_approx=True), "enable_spatial_approx", "cache_level"),
])
def test_an_option_made_meaningless_raises_naming_both(options, a, b):
    with pytest.raises(ValueError, match=rf"FastCacheConfig\.{a} and FastCacheConfig\.{b}"):
        FastCacheConfig(**options)


def test_options_that_do_not_apply_stay_none_and_replace_derives_again():
    c = FastCacheConfig()
    assert c.taylor_order is None and c.front_blocks is None and c.cache_ratio_threshold is None
    assert c.motion_threshold is None and c.token_merge_k is None and c.time_buckets is None
    s = FastCacheConfig(cache_level="step", approx="taylor")
    assert (s.front_blocks, s.back_blocks, s.taylor_order) == (1, 0, 1)
    b = s.replace(cache_level="block", approx="residual")  # the derived front block / order go
    assert b == FastCacheConfig()
    assert FastCacheConfig(decision="chi2").replace(decision="output").error_budget == 0.5


def test_stats_is_typed_and_reads_as_the_old_dict():
    import torch

    st = fastcache_fx.stats(torch.nn.Linear(2, 2))  # never compiled: the empty statistics
    assert isinstance(st, Stats) and st.block_approx_ratio == 0.0 and st["steps"] == 0
    assert st.get("token_select") is None and "trace" in st and st.get("nope", 1) == 1
    assert {**st} == st.to_dict() and st == st.to_dict() and len(st.keys()) == len(st.to_dict())
    with pytest.raises(KeyError):
        st["nope"]


def test_enable_with_a_config_object_and_disable_restores_the_module():
    """``enable_fastcache(pipe, config=...)`` takes the object the backend takes; after
    ``disable_fastcache`` the pipeline holds the uncompiled module again, which computes the eager
    output bit for bit, with no cache entry left."""
    import types

    import torch

    from fastcache_fx import zoo
    from fastcache_fx.runtime import registry

    torch._dynamo.reset()
    model, kw = zoo.build("dit", num_layers=1)
    with torch.no_grad():
        eager = model(**kw).sample
    pipe = types.SimpleNamespace(transformer=model)
    fastcache_fx.enable_fastcache(pipe, config=FastCacheConfig(preset="fast"), warmup_steps=1)
    assert pipe.transformer is not model
    with torch.no_grad():
        for t in (900, 800, 700):
            pipe.transformer(**{**kw, "timestep": torch.full_like(kw["timestep"], t)})
    st = fastcache_fx.stats(pipe)
    assert isinstance(st, Stats) and st.steps == 3 and st.per_graph[0]["cache_level"] == "step"
    assert fastcache_fx.disable_fastcache(pipe) is pipe and pipe.transformer is model
    assert registry.lookup(model) is None and fastcache_fx.stats(model).steps == 0
    with torch.no_grad():
        assert torch.equal(model(**kw).sample, eager)
    with pytest.raises(TypeError):
        fastcache_fx.disable_fastcache(object())
    torch._dynamo.reset()
