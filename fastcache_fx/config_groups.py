"""Grouped options of the advanced features (torchao / diffusers style config objects).

Each group is a frozen dataclass whose fields map one to one onto ``FastCacheConfig`` fields
(``FLAT``); a field left None is not given (the flat default or a preset applies). Values are
checked on construction with the same checks as the flat names (``config_rules.check_value``);
the rules between options run when the groups are given to ``FastCacheConfig``:

    FastCacheConfig(rule=DecisionConfig("output", error_budget=0.25),
                    level=CacheLevelConfig("step", front_blocks=0))
    == FastCacheConfig(decision="output", error_budget=0.25, cache_level="step", front_blocks=0)

Giving ``TokenSelectConfig`` / ``TokenMergeConfig`` switches the pass on
(``enable_spatial_approx`` / ``enable_token_merge``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .config_rules import check_value


class _Group:
    """The shared check and mapping of the group dataclasses."""

    #: group field -> FastCacheConfig field
    FLAT: dict[str, str] = {}
    #: the FastCacheConfig switch that giving the group turns on, if any
    SWITCH: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                object.__setattr__(self, f.name, check_value(self.FLAT[f.name], v, f"{type(self).__name__}.{f.name}"))

    def flat(self) -> dict:
        """{FastCacheConfig field: value} of the given (not None) fields, plus the switch."""
        out = {self.FLAT[f.name]: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        if self.SWITCH is not None:
            out[self.SWITCH] = True
        return out


@dataclass(frozen=True)
class DecisionConfig(_Group):
    """The decision rule: when a block (or span) is approximated (``FastCacheConfig.decision``
    and its knobs; see the flat fields' documentation there).

    Attributes:
        rule: "output" (the default: a budget on the relative error of the transformer's
            output), "error" (a budget per block) or "chi2" (the paper's test) -> ``decision``.
        error_budget: the budget of "output" / "error" (> 0).
        target_psnr: dB to aim for; sets ``error_budget`` of "output".
        cache_ratio_threshold: tau of "chi2" (> 0).
        significance_level: alpha of "chi2" (0 < alpha < 1).
        adaptive_beta: (b0, b1, b2, b3) of "chi2"'s tau(t).
        reference: "anchor" or "previous": what the input change delta is measured against.

    Raises:
        ValueError: a bad value (the message names ``DecisionConfig.<field>``).
    """

    rule: str | None = None
    error_budget: float | None = None
    target_psnr: float | None = None
    cache_ratio_threshold: float | None = None
    significance_level: float | None = None
    adaptive_beta: tuple[float, float, float, float] | None = None
    reference: str | None = None

    FLAT = {"rule": "decision", "error_budget": "error_budget", "target_psnr": "target_psnr",
            "cache_ratio_threshold": "cache_ratio_threshold", "significance_level": "significance_level",
            "adaptive_beta": "adaptive_beta", "reference": "reference"}


@dataclass(frozen=True)
class CacheLevelConfig(_Group):
    """What one decision covers (``passes/spans.py``; docs/architecture.md "Cache levels").

    Attributes:
        level: "block", "step" or "span" -> ``cache_level``.
        front_blocks: leading blocks computed every step (step / span levels; >= 0).
        back_blocks: trailing blocks computed every step (step / span levels; >= 0).
        num_spans: spans of the middle (span level; >= 1).
        span_sizes: depth of each span (span level; ints >= 1), e.g. from ``choose_spans``.

    Raises:
        ValueError: a bad value (the message names ``CacheLevelConfig.<field>``).
    """

    level: str | None = None
    front_blocks: int | None = None
    back_blocks: int | None = None
    num_spans: int | None = None
    span_sizes: tuple[int, ...] | None = None

    FLAT = {"level": "cache_level", "front_blocks": "front_blocks", "back_blocks": "back_blocks",
            "num_spans": "num_spans", "span_sizes": "span_sizes"}


@dataclass(frozen=True)
class CalibrationConfig(_Group):
    """Learned maps of the calibrated kinds (``approx="linear"`` / ``"residual_linear"``) or of
    token selection's ``static_approx``.

    Attributes:
        source: a safetensors file from ``fastcache_fx.calibrate`` or "online" -> ``calibration``.
        rank: r >= 1, low-rank maps W = I + U V^T (must match the file).
        time_buckets: K >= 1 maps per block over equal ranges of t (must match the file).
        refit_every: online refit period in full computations (>= 1).
        online_min_samples: token pairs a block needs before its online map is used (>= 1).

    Raises:
        ValueError: a bad value (the message names ``CalibrationConfig.<field>``).
    """

    source: str | None = None
    rank: int | None = None
    time_buckets: int | None = None
    refit_every: int | None = None
    online_min_samples: int | None = None

    FLAT = {"source": "calibration", "rank": "rank", "time_buckets": "time_buckets", "refit_every": "refit_every",
            "online_min_samples": "online_min_samples"}


@dataclass(frozen=True)
class TokenSelectConfig(_Group):
    """Motion-aware token selection (``passes/token_select.py``); giving it turns
    ``enable_spatial_approx`` on.

    Attributes:
        motion_threshold: relative saliency above which a token is a motion token (>= 0).
        token_buckets: static token counts a variant may compute, fractions in (0, 1].
        static_approx: "cached", "cached_linear" or "linear" (the last two need a stack map).

    Raises:
        ValueError: a bad value (the message names ``TokenSelectConfig.<field>``).
    """

    motion_threshold: float | None = None
    token_buckets: tuple[float, ...] | None = None
    static_approx: str | None = None

    FLAT = {"motion_threshold": "motion_threshold", "token_buckets": "token_buckets", "static_approx": "static_approx"}
    SWITCH = "enable_spatial_approx"


@dataclass(frozen=True)
class TokenMergeConfig(_Group):
    """The token-merge pyramid (``passes/token_merge.py``); giving it turns
    ``enable_token_merge`` on.

    Attributes:
        k: neighbours of the k-NN spatial density (>= 1) -> ``token_merge_k``.
        temporal_weight: lambda >= 0 of S = rho_sp (1 + lambda rho_tm) -> ``token_merge_lambda``.
        num_stages: stages the blocks are split into (>= 1).
        merge_ratio: tokens kept per window from one stage to the next (0 < r <= 1).
        window: side of the square token windows (>= 1) -> ``token_merge_window``.

    Raises:
        ValueError: a bad value (the message names ``TokenMergeConfig.<field>``).
    """

    k: int | None = None
    temporal_weight: float | None = None
    num_stages: int | None = None
    merge_ratio: float | None = None
    window: int | None = None

    FLAT = {"k": "token_merge_k", "temporal_weight": "token_merge_lambda", "num_stages": "num_stages",
            "merge_ratio": "merge_ratio", "window": "token_merge_window"}
    SWITCH = "enable_token_merge"


#: FastCacheConfig keyword -> the group class it takes
GROUPS = {"rule": DecisionConfig, "level": CacheLevelConfig, "maps": CalibrationConfig,
          "token_select": TokenSelectConfig, "token_merge": TokenMergeConfig}
