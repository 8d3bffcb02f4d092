import pytest

from fastcache_fx import FastCacheConfig


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
