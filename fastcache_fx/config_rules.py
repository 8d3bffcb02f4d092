"""What ``FastCacheConfig`` checks: each option's own value (``check_value``) and the rules
between options (``conflicts``: an option another one makes meaningless).

Both are shared by the flat ``FastCacheConfig`` and the grouped configs of ``config_groups``, so
a bad value raises the same ``ValueError`` whichever way it was given (the message names the
field as the user wrote it).
"""

from __future__ import annotations

import math
from typing import Any

DECISIONS = ("chi2", "error", "output")
REFERENCES = ("anchor", "previous")
LOWERINGS = ("inductor", "tensorrt", "inductor_split")
STATIC_APPROX_KINDS = ("cached", "cached_linear", "linear")
CACHE_LEVELS = ("block", "span", "step")
STATE_DTYPES = (None, "bfloat16")

#: the default ``error_budget`` of ``decision="output"`` (docs/quality.md, "How well a budget holds")
DEFAULT_OUTPUT_BUDGET = 0.5
#: PSNR ~ PSNR_AT_UNIT_BUDGET - PSNR_PER_DECADE log10(budget): the lowest PSNR of the bundled DiT, the
#: MMDiT and the unseen DiT at each budget (benchmarks/output_error.py, 2026-12-03), in dB
PSNR_AT_UNIT_BUDGET = 33.6
PSNR_PER_DECADE = 10.0
#: the highest target_psnr the relation is used for (dB; measured up to 46.6 dB at budget 0.05)
MAX_TARGET_PSNR = 50.0


def budget_for_psnr(target_psnr: float) -> float | None:
    """The ``error_budget`` of ``decision="output"`` expected to give at least ``target_psnr`` dB:
    10^((PSNR_AT_UNIT_BUDGET - target) / PSNR_PER_DECADE), the inverse of the lowest PSNR measured
    over three models at each budget (benchmarks/output_error.py; docs/quality.md "How well a budget holds").
    None above ``MAX_TARGET_PSNR``."""
    if target_psnr > MAX_TARGET_PSNR:
        return None
    return 10.0 ** ((PSNR_AT_UNIT_BUDGET - target_psnr) / PSNR_PER_DECADE)


#: the knobs of the chi-square rule: giving one (without ``decision``) selects ``decision="chi2"``
CHI2_KNOBS = ("cache_ratio_threshold", "significance_level", "adaptive_beta")
#: options read only by token selection (``enable_spatial_approx``)
TOKEN_SELECT_KNOBS = ("motion_threshold", "token_buckets", "static_approx")
#: options read only by token merging (``enable_token_merge``)
TOKEN_MERGE_KNOBS = ("token_merge_k", "token_merge_lambda", "num_stages", "merge_ratio", "token_merge_window")
#: options read only by the calibrated approximation kinds' maps
MAP_KNOBS = ("rank", "time_buckets")
#: options read only by online calibration
ONLINE_KNOBS = ("refit_every", "online_min_samples")
#: options read only at the step and span cache levels
LEVEL_KNOBS = ("front_blocks", "back_blocks")

_INTEGERS = {"warmup_steps": 0, "max_consecutive_approx": 0, "trace_steps": 1, "trace_requests": 1, "max_live_requests": 1, "token_merge_k": 1, "num_stages": 1,
             "token_merge_window": 1, "rank": 1, "time_buckets": 1, "refit_every": 1, "online_min_samples": 1,
             "front_blocks": 0, "back_blocks": 0, "num_spans": 1}
_REALS = {
    "cache_ratio_threshold": (lambda x: x > 0, "expected > 0"),
    "significance_level": (lambda x: 0 < x < 1, "expected 0 < alpha < 1"),
    "motion_threshold": (lambda x: x >= 0, "expected >= 0"),
    "timestep_max": (lambda x: x > 0, "expected > 0"),
    "token_merge_lambda": (lambda x: x >= 0, "expected >= 0"),
    "merge_ratio": (lambda x: 0 < x <= 1, "expected 0 < merge_ratio <= 1"),
    "error_budget": (lambda x: x > 0, "expected > 0"),
    "target_psnr": (lambda x: x > 0, "expected > 0 dB"),
}
_BOOLS = ("enable_block_approx", "enable_spatial_approx", "enable_token_merge")
_CHOICES = {"decision": DECISIONS, "reference": REFERENCES, "lowering": LOWERINGS, "static_approx": STATIC_APPROX_KINDS,
            "cache_level": CACHE_LEVELS, "state_dtype": STATE_DTYPES}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(name: str, value: Any, label: str | None = None) -> Any:
    """``value`` of option ``name`` (a ``FastCacheConfig`` field), checked on its own and
    normalised (sequences to tuples, a path to str).

    Raises:
        ValueError: ``"{label}: {why}, got {value!r}"``; ``label`` defaults to
            ``FastCacheConfig.{name}``.
    """
    label = label or f"FastCacheConfig.{name}"

    def bad(why: str) -> ValueError:
        return ValueError(f"{label}: {why}, got {value!r}")

    if name in _INTEGERS:
        if isinstance(value, bool) or not isinstance(value, int) or value < _INTEGERS[name]:
            raise bad(f"expected an integer >= {_INTEGERS[name]}")
    elif name in _REALS:
        ok, why = _REALS[name]
        if not _number(value):
            raise bad("expected a finite number")
        if not ok(value):
            raise bad(why)
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise bad("expected a bool")
    elif name in _CHOICES:
        if value not in _CHOICES[name]:
            raise bad(f"expected one of {_CHOICES[name]}")
    elif name == "approx":
        from .approx import KINDS  # one module per kind; the registry is the list

        if value not in KINDS:
            raise bad(f"expected one of {tuple(KINDS)}")
    elif name == "taylor_order":
        if isinstance(value, bool) or value not in (1, 2):
            raise bad("expected 1 or 2")
    elif name == "adaptive_beta":
        if not isinstance(value, (tuple, list)) or len(value) != 4 or not all(_number(x) for x in value):
            raise bad("expected 4 finite numbers (b0, b1, b2, b3)")
        return tuple(float(x) for x in value)
    elif name == "token_buckets":
        if (not isinstance(value, (tuple, list)) or not value
                or not all(_number(x) and 0 < x <= 1 for x in value)):
            raise bad("expected a non-empty sequence of fractions in (0, 1]")
        return tuple(sorted({float(x) for x in value}))
    elif name == "span_sizes":
        if (not isinstance(value, (tuple, list)) or not value
                or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
            raise bad("expected a non-empty sequence of integers >= 1")
        return tuple(value)
    elif name == "calibration":
        return value if isinstance(value, str) else str(value)  # a pathlib.Path
    return value


def _psnr_budget(target_psnr) -> float | None:
    """The budget a config with ``target_psnr`` derives (a resolved config carries both)."""
    if not _number(target_psnr):
        return None
    return budget_for_psnr(min(float(target_psnr), MAX_TARGET_PSNR))


def _calibrated(approx: str) -> bool:
    from .approx import KINDS

    return KINDS[approx].calibrated


def conflicts(given: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The pairs of options in ``given`` (option name -> value, the options the user set, none
    of them None) where one makes the other meaningless: ``(option, other option, why)``.

    The rules: the chi-square knobs belong to ``decision="chi2"``, whose test has no
    ``error_budget`` and no ``target_psnr``; ``adaptive_beta`` replaces ``cache_ratio_threshold``;
    ``taylor_order`` belongs to ``approx="taylor"``; ``rank`` / ``time_buckets`` to a calibrated
    kind; ``refit_every`` / ``online_min_samples`` to ``calibration="online"``; a calibration
    needs a kind or a ``static_approx`` that reads a map; the token-selection and token-merging
    knobs to their switch, and the two passes exclude each other; ``front_blocks`` /
    ``back_blocks`` to the step and span levels, ``num_spans`` / ``span_sizes`` to the span level;
    the step and span levels exclude calibrated kinds and the token passes (a span has no
    per-block map, and its residual cannot follow tokens that change between blocks).
    """
    out: list[tuple[str, str, str]] = []
    g = given
    decision = g.get("decision")
    knobs = [n for n in CHI2_KNOBS if n in g]
    if decision in ("output", "error"):
        out += [(k, "decision", f"a knob of decision='chi2', not of decision={decision!r}") for k in knobs]
    rule = decision or ("chi2" if knobs else "output")
    why_rule = "decision" if decision is not None else (knobs[0] if knobs else "decision")
    if rule == "chi2":
        for n in ("error_budget", "target_psnr"):
            if n in g:
                out.append((n, why_rule, "the chi-square rule has no error budget (give error_budget / target_psnr "
                                         "with decision='output', or cache_ratio_threshold with decision='chi2')"))
    elif rule == "error" and "target_psnr" in g:
        out.append(("target_psnr", "decision", "target_psnr sets the budget of decision='output'"))
    if "target_psnr" in g and "error_budget" in g and g["error_budget"] != _psnr_budget(g["target_psnr"]):
        out.append(("target_psnr", "error_budget", "target_psnr sets error_budget: give one of them"))
    if "adaptive_beta" in g and "cache_ratio_threshold" in g:
        out.append(("cache_ratio_threshold", "adaptive_beta", "adaptive_beta's tau(t) replaces the constant tau"))
    approx = g.get("approx", "residual")
    if "taylor_order" in g and approx != "taylor":
        out.append(("taylor_order", "approx", f"the order of approx='taylor', not of approx={approx!r}"))
    calibrated = _calibrated(approx) if isinstance(approx, str) else False
    for n in MAP_KNOBS:
        if n in g and not calibrated:
            out.append((n, "approx", f"shapes the maps of a calibrated kind ('linear', 'residual_linear'); "
                                     f"approx={approx!r} has none"))
    calibration = g.get("calibration")
    for n in ONLINE_KNOBS:
        if n in g and calibration != "online":
            out.append((n, "calibration", "an option of calibration='online'"))
    spatial, merge = g.get("enable_spatial_approx", False), g.get("enable_token_merge", False)
    stack_map = spatial and g.get("static_approx", "cached") != "cached"
    if calibration is not None and not calibrated and not (stack_map and calibration != "online"):
        out.append(("calibration", "approx", f"nothing reads the maps: approx={approx!r} has none (use 'linear' or "
                                             "'residual_linear'; token selection's static_approx='linear' or "
                                             "'cached_linear' reads a stack-map file)"))
    out += [(n, "enable_spatial_approx", "a token-selection option; token selection is off")
            for n in TOKEN_SELECT_KNOBS if n in g and not spatial]
    out += [(n, "enable_token_merge", "a token-merging option; token merging is off")
            for n in TOKEN_MERGE_KNOBS if n in g and not merge]
    if spatial and merge:
        out.append(("enable_spatial_approx", "enable_token_merge", "token selection and token merging do not combine"))
    level = g.get("cache_level", "block")
    if level == "block":
        out += [(n, "cache_level", "computes blocks every step at the step and span levels; cache_level='block' "
                                   "decides per block") for n in LEVEL_KNOBS if n in g]
    if g.get("lowering") == "inductor_split" and level == "block":
        out.append(("lowering", "cache_level", "'inductor_split' cuts the step at its decisions, one cut per span; "
                                               "the block level has a decision per block (use cache_level='step' "
                                               "or 'span', or lowering='inductor')"))
    for n in ("num_spans", "span_sizes"):
        if n in g and level != "span":
            out.append((n, "cache_level", f"cuts the middle into spans at cache_level='span', not {level!r}"))
    if "num_spans" in g and isinstance(g.get("span_sizes"), (tuple, list)) and g["num_spans"] != len(g["span_sizes"]):
        out.append(("num_spans", "span_sizes", "num_spans is the count of span_sizes"))
    if level != "block":
        if calibrated:
            out.append(("approx", "cache_level", f"cache_level={level!r} approximates spans of blocks, which have no "
                                                 "calibrated map; use 'residual' or 'taylor' (or cache_level='block')"))
        for n, what in (("enable_spatial_approx", "token selection"), ("enable_token_merge", "token merging")):
            if g.get(n):
                out.append((n, "cache_level", f"{what} changes the tokens between blocks, which a span's residual "
                                              f"cannot follow; not with cache_level={level!r}"))
    return out
