import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one thread each (OpenMP spin-waits otherwise)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def hooked_dit_call(model, x, labels, t, replace=None):
    """(model output, [(input, output)] per block) of one eager call of a DiT at timestep ``t``;
    ``replace``: {block index: fn(input, output) -> the output to continue with}."""
    rec = []

    def hook(i):
        def fn(mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            rec.append((h.detach().clone(), out.detach().clone()))
            return replace[i](h, out) if replace and i in replace else None
        return fn

    hs = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(model.transformer_blocks)]
    try:
        out = model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample
    finally:
        for h in hs:
            h.remove()
    return out, rec


def dynamo_graph(model, kwargs):
    """(Dynamo's graph of ``model(**kwargs)``, its example inputs), captured without compiling."""
    cap = {}

    def backend(gm, example_inputs, **_):
        cap["gm"], cap["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    return cap["gm"], cap["inputs"]


def assert_parallel_equals_one_process(par: dict, single: dict) -> None:
    """The checks shared by the context-parallel and xDiT tests (``cp_worker.trajectories``):
    approximation off, each step equals one process; approximation on, the same decisions as one
    process on the whole sequence, on every rank, including step 4, where only rank 1's shard
    changes (rank 0 alone would approximate), and the same outputs."""
    assert not any(any(r) for r in par["off_trace"])
    for a, b in zip(par["off"], single["off"]):
        assert rel_err(a, b) < 1e-5
    assert par["on_trace"] == single["on_trace"]
    assert par["traces_of_ranks"][0] == par["traces_of_ranks"][1] == par["on_trace"]
    assert any(all(r) for r in par["on_trace"]) and not any(par["on_trace"][4])
    for a, b in zip(par["on"], single["on"]):
        assert rel_err(a, b) < 1e-5



# --- test tiers -----------------------------------------------------------------------------------
# The default tier (`python -m pytest`, pyproject addopts `-m "not slow"`) is what a newcomer runs: at
# most 10 minutes cold on 2 cores. It keeps one representative per structural kind and per feature;
# everything else is the second tier (`python -m pytest -m slow`), which CI runs too (.ci/run).
# Tests mark themselves with @pytest.mark.slow; the tables below tier whole modules and the
# parameters of parametrized tests, so the choice is in one place.

#: modules whose every test is in the second tier
SLOW_MODULES = frozenset({
    "test_many_models.py", "test_online_calibration.py", "test_token_select_linear.py", "test_tune.py",
    "test_wan_reference.py", "test_mmdit.py", "test_compare.py", "test_xdit.py", "test_export.py",
})

#: parametrized tests: the parameter ids kept in the default tier (the others are second tier)
DEFAULT_PARAMS = {
    "test_backend.py::test_disabled_approximation_equals_eager_fullgraph": {"dit-1", "dit-2"},
    "test_blocks.py::test_find_blocks_on_diffusers_families": None,  # tracing only: all kept
    "test_cache_levels.py::test_span_taylor_forecast_equals_eager_extrapolation": {"None"},
    "test_explain.py::test_explain_finds_every_block": {"dit", "flux"},
    "test_pipelines.py::": {"pixart"},  # the pipeline fixture's families
    "test_video_pipelines.py::": {"wan"},
    "test_regional.py::test_regional_equals_model_with_approximation_off": {"flux"},
    "test_regional.py::test_regional_options_equal_whole_graph": set(),
    "test_reference.py::test_demo_writes_png_and_json": set(),
    "test_token_merge.py::test_compiled_dit_with_token_merge": {"0.5"},
    "test_conformance_video.py::test_unet_layer_is_refused_with_reason": {"Transformer2DModel"},
}

#: single tests in the second tier (the module stays in the default tier)
SLOW_TESTS = frozenset({
    "test_backend.py::test_enable_fastcache_follows_diffusers_cache_context",
    "test_blocks.py::test_transposed_stream_input_compiles_and_matches_eager",
    "test_blocks.py::test_strided_graph_inputs_are_copied_contiguous_for_the_cond",
    "test_calibration.py::test_compiled_linear_approximation_uses_the_calibration",
    "test_config.py::test_enable_with_a_config_object_and_disable_restores_the_module",
    "test_dynamic_shapes.py::test_shape_change_on_one_graph_never_reuses_state",
    "test_dynamic_shapes.py::test_fallback_graph_is_reported_and_counts_as_full",
    "test_explain.py::test_explain_cli_trace",
    "test_forecast.py::test_taylor_with_a_float32_timestep",
    "test_pipelines.py::test_two_threads_two_pipelines",
    "test_pipelines.py::test_second_resolution_keeps_the_cache",
    "test_quality_target.py::test_pipeline_target_shares_one_graph_and_meets_the_final_error_budget",
    "test_token_select.py::test_zero_threshold_equals_block_only_path",
    "test_token_select.py::test_unchanged_tokens_are_approximated_and_buckets_follow_motion",
    "test_token_select.py::test_motion_tokens_match_the_blocks_on_that_subset",
    "test_token_select.py::test_new_trajectory_runs_every_token",
    "test_video_pipelines.py::test_second_frame_count_keeps_the_cache",
    "test_backend.py::test_models_sharing_a_compiled_graph_keep_their_own_state",
    "test_cache_levels.py::test_step_level_follows_resolutions_with_default_compile",
    "test_calibration.py::test_cli_calibrates_reference",
    "test_calibration.py::test_time_buckets_fit_one_map_per_timestep_range",
    "test_calibration.py::test_compiled_residual_linear_from_a_file",
    "test_calibration.py::test_low_rank_error_falls_as_rank_grows",
    "test_dynamic_shapes.py::test_dynamic_true_bakes_float_attributes",
    "test_export.py::test_split_runtime_matches_backend_over_trajectory",
    "test_export.py::test_split_program_with_eager_engines_equals_graph",
    "test_export.py::test_corrupted_or_mismatched_manifest_is_refused",
    "test_export.py::test_calibrated_linear_maps_travel_in_safetensors",
    "test_pipelines.py::test_model_cpu_offload",
    "test_pipelines.py::test_lora_after_compiling",
    "test_pipelines.py::test_cut_trajectory_then_lower_schedule_starts_over",
    "test_regional.py::test_compile_repeated_blocks_with_fastcache_backend",
    "test_regional.py::test_regional_block_with_aliased_stream_inputs",
    "test_token_select.py::test_sd3_variant_matches_its_blocks_on_the_same_token_subset",
    "test_video_pipelines.py::test_wan22_experts_keep_their_own_cache",
    "test_video_pipelines.py::test_wan22_experts_target_psnr_each_its_guidance_share_and_calibration",
})


def _param_id(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.id


def in_default_tier(item) -> bool:
    """Whether a collected test belongs to the default tier (see the tables above)."""
    module = item.path.name
    name = item.originalname or item.name
    if module in SLOW_MODULES or f"{module}::{name}" in SLOW_TESTS:
        return False
    pid = _param_id(item)
    if pid is None:
        return True
    for key in (f"{module}::{name}", f"{module}::"):
        if key in DEFAULT_PARAMS:
            keep = DEFAULT_PARAMS[key]
            return keep is None or any(p in keep for p in pid.split("-")) or pid in keep
    return True


#: second-tier tests that failed in the last full run after the round's branches were merged
#: (node id -> the error); expected to fail until fixed, reported in the closing note (not strict:
#: a fix shows as XPASS)
KNOWN_FAILURES: dict[str, str] = {
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not in_default_tier(item):
            item.add_marker(pytest.mark.slow)
        reason = KNOWN_FAILURES.get(item.nodeid)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
