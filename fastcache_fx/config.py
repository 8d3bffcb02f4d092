"""FastCacheConfig: every option of the backend, validated once (torchao-style config object)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

DECISIONS = ("chi2", "error", "output")
REFERENCES = ("anchor", "previous")
LOWERINGS = ("inductor", "tensorrt")
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


@dataclass(frozen=True)
class FastCacheConfig:
    """Options of the ``fastcache`` backend.

    Names follow the FastCache reference code where it has one (``cache_ratio_threshold``,
    ``significance_level``, ``motion_threshold``, ``adaptive_beta``, ``enable_block_approx``).

    Attributes:
        cache_ratio_threshold: tau, the relative change ||H - A||_F / ||A||_F of a block input
            under which the block may be approximated (docs/advanced.md "The chi-square rule"); None: 0.05.
            Giving it (or ``significance_level`` / ``adaptive_beta``) selects ``decision="chi2"``
            unless ``decision`` is given.
        significance_level: alpha of the chi-square test; the bound is
            tau^2 * chi2.ppf(1 - alpha, ND) / ND (FastCache sec. 3.2, with tau made explicit).
        motion_threshold: relative saliency under which a token counts as static (token selection):
            S_i = ||X_t,i - X_ref,i||^2 / mean_j ||X_ref,j||^2, unitless (``passes/token_select.py``).
        enable_spatial_approx: motion-aware token selection (``passes/token_select.py``): only
            the motion tokens run through the block stack, the static ones are approximated.
        token_buckets: the static token counts a variant may compute, as fractions of the image
            tokens N (each in (0, 1]; 1.0 is always added): one compiled variant per bucket at most.
        static_approx: approximation of the static tokens' stack output: "cached" (the previous
            output), "cached_linear" (previous output + W_s (X_t - X_ref)) or "linear"
            (W_s X_t + b_s); the last two need a stack map in the calibration, from
            ``calibrate(kind="stack_linear" / "stack_cached_linear")`` (else "cached", with a warning).
        adaptive_beta: (b0, b1, b2, b3) of tau(t) = b0 + b1 delta + b2 t + b3 t^2 with t the
            timestep divided by ``timestep_max``; None keeps tau constant.
        enable_block_approx: False keeps the rewritten graph but never approximates.
        warmup_steps: steps of each trajectory that always compute every block fully (>= 0;
            the first step of a trajectory is always full regardless).
        max_consecutive_approx: a block is recomputed after this many approximations in a row.
        approx: "residual" (H + R_anchor), "linear" (W H + b, the paper's rule),
            "residual_linear" (H + R_anchor + W (H - H_anchor)) or "taylor" (H + R_hat(t): the
            residuals of the block's last ``taylor_order`` + 1 full computations extrapolated to
            this step's timestep; TaylorSeer, arXiv 2503.06923, ``ops.forecast``).
        taylor_order: 1 or 2, the order of the ``taylor`` forecast.
        decision: None resolves to "chi2" when a chi-square knob (``cache_ratio_threshold``,
            ``significance_level``, ``adaptive_beta``) is given, else to "output" (the default).
            "output": the budget is on the relative error of the transformer's output (what the
            sampler consumes), predicted from the errors measured at full computations and
            summed over the blocks approximated in a step and over a run of consecutive steps
            with approximations (``ops.output_error``); "chi2" (the paper's test: approximate
            iff delta^2 <= tau^2 chi2.ppf(1 - alpha, ND) / ND); "error" (the previous default:
            per block, approximate iff delta times the block's measured error per unit of delta
            is at most ``error_budget``; ``ops.forecast.update_error_estimate``).
        error_budget: None: ``DEFAULT_OUTPUT_BUDGET`` (0.5) under "output" (or the budget of
            ``target_psnr``), 0.05 under "error". Under "output": the bound on the predicted
            relative output error ||O_hat - O||_F / ||O||_F of a run of approximated steps; under
            "error": on the predicted relative error ||Y_hat - Y||_F / ||Y||_F of one block's
            output (> 0).
        target_psnr: the PSNR (dB, final images or latents against computing every block) to
            aim for: sets ``error_budget`` of ``decision="output"`` from the relation measured
            on three models (``budget_for_psnr``); None: not used. A target above what the
            relation covers (``MAX_TARGET_PSNR``) warns and computes every block fully.
        reference: "anchor" compares with the input at the last full computation, "previous"
            with the previous step's input (the paper's exact rule).
        calibration: None, a path to a safetensors file from ``fastcache_fx.calibrate``, or
            "online": the graph accumulates the ridge statistics of every full computation and
            the runtime refits the maps as it goes (``runtime/online.py``).
        rank: None (full maps) or r >= 1: W = I + U V^T, applied in O(N D r).
        time_buckets: K >= 1 maps per block, for K equal ranges of t = timestep / timestep_max.
        refit_every: online calibration refits a block's map after this many new full
            computations of it (>= 1).
        online_min_samples: token pairs a block (and bucket) needs before its online map is used
            (``residual`` until then); None: 2 D.
        timestep_max: the timestep value that maps to t_norm = 1 (1000 for DDPM-style
            timesteps, 1 for flow-matching pipelines that pass sigmas).
        lowering: "inductor" or "tensorrt".
        trace_steps: how many steps of per-block decisions ``stats()`` keeps (ring buffer).
        enable_token_merge: insert the token-merge pyramid (``passes/token_merge.py``, FastCache
            v3 token merging) before the block cache.
        token_merge_k: K, neighbours of the k-NN spatial density (>= 1).
        token_merge_lambda: lambda >= 0, weight of the temporal saliency in the importance
            S = rho_sp (1 + lambda rho_tm).
        num_stages: stages the blocks are split into (>= 1; tokens are merged between stages).
        merge_ratio: tokens kept per window from one stage to the next, 0 < r <= 1 (1: identity).
        token_merge_window: side of the square token windows clusters are formed in (>= 1);
            a merge costs O(N * window^2).
        cache_level: what one decision (one ``torch.cond``) covers (``passes/spans.py``): "block"
            (every block its own), "step" (the first ``front_blocks`` and last ``back_blocks``
            blocks always computed, the rest of the stack one span: one decision per step, on
            the change of the front blocks' output, as FirstBlockCache / DBCache) or "span"
            (the middle cut into ``num_spans`` spans of equal depth). A span keeps one anchor
            input and one residual per stream (plus the kind's history), whatever its depth.
        front_blocks: Fn >= 0, leading blocks computed every step at the step and span levels.
        back_blocks: Bn >= 0, trailing blocks computed every step at the step and span levels.
        num_spans: spans of the middle at ``cache_level="span"`` (>= 1).
        span_sizes: None (``num_spans`` spans of equal depth) or the depth of each span of the
            middle at ``cache_level="span"``, in order (ints >= 1; ``num_spans`` becomes their
            count). ``fastcache_fx.choose_spans`` picks them from the errors measured in a
            block-level run. Where they do not add up to the blocks between the front and back
            blocks, equal depths are used, with a warning.
        state_dtype: None (cache state in the model's dtype) or "bfloat16": stream-sized state
            (anchor inputs, residuals, forecast history) of a float32 model is stored in bfloat16
            and read back in float32, halving the cache memory (the decision and the forecast still
            compute in float32; a 16-bit model's state is unchanged). bfloat16 keeps float32's
            exponent range, so a finite value stays finite.
    """

    cache_ratio_threshold: float | None = None
    significance_level: float | None = None
    motion_threshold: float = 0.1
    adaptive_beta: tuple[float, float, float, float] | None = None
    enable_block_approx: bool = True
    warmup_steps: int = 2
    max_consecutive_approx: int = 3
    approx: str = "residual"
    taylor_order: int = 1
    decision: str | None = None
    error_budget: float | None = None
    target_psnr: float | None = None
    reference: str = "anchor"
    calibration: str | None = None
    rank: int | None = None
    time_buckets: int = 1
    refit_every: int = 8
    online_min_samples: int | None = None
    timestep_max: float = 1000.0
    lowering: str = "inductor"
    trace_steps: int = 10000
    enable_spatial_approx: bool = False
    token_buckets: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    static_approx: str = "cached"
    enable_token_merge: bool = False
    token_merge_k: int = 5
    token_merge_lambda: float = 1.0
    num_stages: int = 3
    merge_ratio: float = 0.5
    token_merge_window: int = 4
    cache_level: str = "block"
    front_blocks: int = 1
    back_blocks: int = 0
    num_spans: int = 2
    span_sizes: tuple[int, ...] | None = None
    state_dtype: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"FastCacheConfig.{name}: {why}, got {getattr(self, name)!r}")

        def real(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "expected a finite number")
            return float(v)

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"expected an integer >= {lo}")

        if self.decision is None:  # the knob the user set picks its rule
            chi2_knob = any(getattr(self, n) is not None for n in ("cache_ratio_threshold", "significance_level",
                                                                     "adaptive_beta"))
            object.__setattr__(self, "decision", "chi2" if chi2_knob else "output")
        for name in ("cache_ratio_threshold", "significance_level"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, 0.05)
        if real("cache_ratio_threshold") <= 0:
            raise bad("cache_ratio_threshold", "expected > 0")
        if not 0 < real("significance_level") < 1:
            raise bad("significance_level", "expected 0 < alpha < 1")
        if real("motion_threshold") < 0:
            raise bad("motion_threshold", "expected >= 0")
        if real("timestep_max") <= 0:
            raise bad("timestep_max", "expected > 0")
        integer("warmup_steps", 0)
        integer("max_consecutive_approx", 0)
        integer("trace_steps", 1)
        integer("token_merge_k", 1)
        integer("num_stages", 1)
        integer("token_merge_window", 1)
        if real("token_merge_lambda") < 0:
            raise bad("token_merge_lambda", "expected >= 0")
        if not 0 < real("merge_ratio") <= 1:
            raise bad("merge_ratio", "expected 0 < merge_ratio <= 1")
        for name in ("enable_block_approx", "enable_spatial_approx", "enable_token_merge"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "expected a bool")
        if self.adaptive_beta is not None:
            b = self.adaptive_beta
            if (not isinstance(b, (tuple, list)) or len(b) != 4
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in b)):
                raise bad("adaptive_beta", "expected 4 finite numbers (b0, b1, b2, b3)")
            object.__setattr__(self, "adaptive_beta", tuple(float(x) for x in b))
        tb = self.token_buckets
        if (not isinstance(tb, (tuple, list)) or not tb
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in tb)):
            raise bad("token_buckets", "expected a non-empty sequence of fractions in (0, 1]")
        object.__setattr__(self, "token_buckets", tuple(sorted({float(x) for x in tb})))
        if self.static_approx not in STATIC_APPROX_KINDS:
            raise bad("static_approx", f"expected one of {STATIC_APPROX_KINDS}")
        from .approx import KINDS  # one module per kind; the registry is the list

        if self.approx not in KINDS:
            raise bad("approx", f"expected one of {tuple(KINDS)}")
        if isinstance(self.taylor_order, bool) or self.taylor_order not in (1, 2):
            raise bad("taylor_order", "expected 1 or 2")
        if self.decision not in DECISIONS:
            raise bad("decision", f"expected one of {DECISIONS}")
        self._resolve_budget(bad, real)
        if real("error_budget") <= 0:
            raise bad("error_budget", "expected > 0")
        if self.reference not in REFERENCES:
            raise bad("reference", f"expected one of {REFERENCES}")
        if self.lowering not in LOWERINGS:
            raise bad("lowering", f"expected one of {LOWERINGS}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            object.__setattr__(self, "calibration", str(self.calibration))
        if self.rank is not None:
            integer("rank", 1)
        integer("time_buckets", 1)
        integer("refit_every", 1)
        if self.online_min_samples is not None:
            integer("online_min_samples", 1)
        self._check_level(bad, integer, KINDS)
        if self.state_dtype not in STATE_DTYPES:
            raise bad("state_dtype", f"expected one of {STATE_DTYPES}")

    def _check_level(self, bad, integer, kinds) -> None:
        """``cache_level`` and its counts; a span has no calibrated map (maps are fitted per block)."""
        if self.cache_level not in CACHE_LEVELS:
            raise bad("cache_level", f"expected one of {CACHE_LEVELS}")
        integer("front_blocks", 0)
        integer("back_blocks", 0)
        integer("num_spans", 1)
        if self.span_sizes is not None:
            sz = self.span_sizes
            if (not isinstance(sz, (tuple, list)) or not sz
                    or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in sz)):
                raise bad("span_sizes", "expected a non-empty sequence of integers >= 1")
            if self.cache_level != "span":
                raise bad("span_sizes", "needs cache_level='span'")
            object.__setattr__(self, "span_sizes", tuple(sz))
            object.__setattr__(self, "num_spans", len(sz))
        if self.cache_level != "block":
            if kinds[self.approx].calibrated:
                raise bad("approx", f"cache_level={self.cache_level!r} approximates spans of blocks, which have no "
                                    "calibrated map; use 'residual' or 'taylor' (or cache_level='block')")
            if self.calibration == "online":
                raise bad("calibration", f"online calibration fits per-block maps; not with "
                                         f"cache_level={self.cache_level!r}")

    def _resolve_budget(self, bad, real) -> None:
        """``error_budget`` from ``target_psnr`` or the decision rule's default (``replace``
        derives it again: ``_derived_budget``)."""
        object.__setattr__(self, "_derived_budget", self.error_budget is None)
        if self.target_psnr is not None:
            if real("target_psnr") <= 0:
                raise bad("target_psnr", "expected > 0 dB")
            if self.decision != "output":
                raise bad("target_psnr", f"needs decision='output' (decision is {self.decision!r})")
            if self.error_budget is not None:
                raise bad("target_psnr", "give target_psnr or error_budget, not both")
            budget = budget_for_psnr(float(self.target_psnr))
            if budget is None:
                import warnings

                warnings.warn(f"fastcache: target_psnr={self.target_psnr} dB is above what the measured relation "
                              f"covers ({MAX_TARGET_PSNR} dB): every block is computed fully", stacklevel=4)
                object.__setattr__(self, "enable_block_approx", False)
                budget = budget_for_psnr(MAX_TARGET_PSNR)
            object.__setattr__(self, "error_budget", budget)
        elif self.error_budget is None:
            object.__setattr__(self, "error_budget", DEFAULT_OUTPUT_BUDGET if self.decision == "output" else 0.05)

    def store_dtype(self, dtype):
        """The dtype stream-sized cache state of a ``dtype`` model is stored in (``state_dtype``):
        bfloat16 for a wider floating dtype when asked, else ``dtype``."""
        import torch

        if self.state_dtype is None or not dtype.is_floating_point or dtype.itemsize <= 2:
            return dtype
        return getattr(torch, self.state_dtype)

    @property
    def measures_error(self) -> bool:
        """The decision rule measures the approximation's error at full computations
        (``decision`` "error" or "output")."""
        return self.decision in ("error", "output")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "FastCacheConfig" | None = None, **kwargs: Any) -> "FastCacheConfig":
        """Build from ``torch.compile(options=...)`` or keyword arguments.

        Raises:
            ValueError: an unknown option name (named in the message) or a bad value.
        """
        if isinstance(options, FastCacheConfig):
            return options.replace(**kwargs) if kwargs else options
        merged = {**dict(options or {}), **kwargs}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"FastCacheConfig.{unknown[0]}: unknown option (known: {', '.join(sorted(names))})")
        return cls(**merged)

    def replace(self, **kwargs: Any) -> "FastCacheConfig":
        """A copy with some fields changed (validated again)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if getattr(self, "_derived_budget", False) and "error_budget" not in kwargs:
            d["error_budget"] = None  # from target_psnr or the (new) decision rule's default
        d.update(kwargs)
        return FastCacheConfig.from_options(d)

    def to_dict(self) -> dict:
        """JSON-friendly dict of every option (for manifests and reports)."""
        return asdict(self)
