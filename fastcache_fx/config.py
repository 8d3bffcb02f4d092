"""FastCacheConfig: every option of the backend, validated once (torchao-style config object).

Options are given flat (``FastCacheConfig(cache_level="step", front_blocks=0)``), grouped
(``FastCacheConfig(level=CacheLevelConfig("step", front_blocks=0))``, ``config_groups``) or as a
preset (``FastCacheConfig(preset="fast")``, ``presets``), in any mix; the result is the same
flat, frozen object. An option that another option makes meaningless raises ``ValueError``
naming both (``config_rules.conflicts``); an option that does not apply stays None.
"""

from __future__ import annotations

from dataclasses import InitVar, asdict, dataclass, fields
from typing import Any, Mapping

from .config_groups import (GROUPS, CacheLevelConfig, CalibrationConfig, DecisionConfig, TokenMergeConfig,
                            TokenSelectConfig)
from .config_rules import (CACHE_LEVELS, CHI2_KNOBS, DECISIONS, DEFAULT_OUTPUT_BUDGET,  # noqa: F401
                           LOWERINGS, MAX_TARGET_PSNR, PSNR_AT_UNIT_BUDGET, PSNR_PER_DECADE, REFERENCES, STATE_DTYPES,
                           STATIC_APPROX_KINDS, _calibrated, budget_for_psnr, check_value, conflicts)
from .presets import preset_options

#: option -> (the feature it belongs to, its default where the feature is on); where the feature
#: is off the option stays None (``FastCacheConfig._fill_defaults``)
_APPLIES = {
    "cache_ratio_threshold": ("chi2", 0.05), "significance_level": ("chi2", 0.05),
    "taylor_order": ("taylor", 1), "time_buckets": ("maps", 1), "refit_every": ("online", 8),
    "motion_threshold": ("select", 0.1), "token_buckets": ("select", (0.25, 0.5, 0.75, 1.0)),
    "static_approx": ("select", "cached"),
    "token_merge_k": ("merge", 5), "token_merge_lambda": ("merge", 1.0), "num_stages": ("merge", 3),
    "merge_ratio": ("merge", 0.5), "token_merge_window": ("merge", 4),
    "front_blocks": ("spans", 1), "back_blocks": ("spans", 0), "num_spans": ("span", 2),
}

@dataclass(frozen=True)
class FastCacheConfig:
    """Options of the ``fastcache`` backend.

    Names follow the FastCache reference code where it has one (``cache_ratio_threshold``,
    ``significance_level``, ``motion_threshold``, ``adaptive_beta``, ``enable_block_approx``).

    A field left None is not given: it takes its default where it applies and stays None where
    it does not (``taylor_order`` is None unless ``approx="taylor"``, ``front_blocks`` is None at
    the block level, the token passes' knobs are None while the pass is off...). Giving an option
    that another option makes meaningless raises ``ValueError`` naming both
    (``config_rules.conflicts``: e.g. ``error_budget`` with ``cache_ratio_threshold``, which selects
    the chi-square rule; ``taylor_order`` without ``approx="taylor"``; ``rank`` without a
    calibrated kind; ``front_blocks`` at the block level; token selection with token merging).

    Keyword-only extras (not stored; the flat fields carry their values, so configs built either
    way compare equal):

    - ``preset``: "quality", "balanced" (the defaults) or "fast", a set of options chosen from the
      measured results (``fastcache_fx.presets`` cites the rows); given options override the
      preset's, and a preset option that a given one makes meaningless is left out.
    - ``rule`` (``DecisionConfig``), ``level`` (``CacheLevelConfig``), ``maps``
      (``CalibrationConfig``), ``token_select`` (``TokenSelectConfig``), ``token_merge``
      (``TokenMergeConfig``): the options of one feature as one object (``config_groups``); the
      same option given flat with another value raises.

    Attributes:
        cache_ratio_threshold: tau, the relative change ||H - A||_F / ||A||_F of a block input
            under which the block may be approximated (docs/advanced.md "The chi-square rule"); 0.05
            under ``decision="chi2"``, else None.
            Giving it (or ``significance_level`` / ``adaptive_beta``) selects ``decision="chi2"``
            unless ``decision`` is given.
        significance_level: alpha of the chi-square test (0.05 under ``decision="chi2"``); the bound is
            tau^2 * chi2.ppf(1 - alpha, ND) / ND (FastCache sec. 3.2, with tau made explicit).
        motion_threshold: relative saliency under which a token counts as static (token selection):
            S_i = ||X_t,i - X_ref,i||^2 / mean_j ||X_ref,j||^2, unitless (``passes/token_select.py``);
            0.1 with token selection on.
        enable_spatial_approx: motion-aware token selection (``passes/token_select.py``): only
            the motion tokens run through the block stack, the static ones are approximated.
        token_buckets: the static token counts a variant may compute, as fractions of the image
            tokens N (each in (0, 1]; 1.0 is always added): one compiled variant per bucket at most;
            (0.25, 0.5, 0.75, 1.0) with token selection on.
        static_approx: approximation of the static tokens' stack output: "cached" (the previous
            output), "cached_linear" (previous output + W_s (X_t - X_ref)) or "linear"
            (W_s X_t + b_s); the last two need a stack map in the calibration, from
            ``calibrate(kind="stack_linear" / "stack_cached_linear")`` (else "cached", with a warning);
            "cached" with token selection on.
        adaptive_beta: (b0, b1, b2, b3) of tau(t) = b0 + b1 delta + b2 t + b3 t^2 with t the
            timestep divided by ``timestep_max``; None keeps tau constant.
        enable_block_approx: False keeps the rewritten graph but never approximates.
        warmup_steps: steps of each trajectory that always compute every block fully (>= 0;
            the first step of a trajectory is always full regardless).
        max_consecutive_approx: a block is recomputed after this many approximations in a row (3).
        approx: "residual" (the default: H + R_anchor), "linear" (W H + b, the paper's rule),
            "residual_linear" (H + R_anchor + W (H - H_anchor)) or "taylor" (H + R_hat(t): the
            residuals of the block's last ``taylor_order`` + 1 full computations extrapolated to
            this step's timestep; TaylorSeer, arXiv 2503.06923, ``ops.forecast``).
        taylor_order: 1 (default) or 2, the order of the ``taylor`` forecast (only with it).
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
            ``target_psnr``), 0.05 under "error"; "chi2" has none. Under "output": the bound on the predicted
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
        rank: None (full maps) or r >= 1: W = I + U V^T, applied in O(N D r) (calibrated kinds only).
        time_buckets: K >= 1 maps per block, for K equal ranges of t = timestep / timestep_max
            (calibrated kinds only; 1 there).
        refit_every: online calibration refits a block's map after this many new full
            computations of it (>= 1; 8).
        online_min_samples: token pairs a block (and bucket) needs before its online map is used
            (``residual`` until then); None: 2 D.
        timestep_max: the timestep value that maps to t_norm = 1 (1000 for DDPM-style
            timesteps, 1 for flow-matching pipelines that pass sigmas).
        lowering: "inductor" (one graph, each cond a host-side branch; no CUDA graphs with a
            cond), "tensorrt", or "inductor_split" (the step and span levels only: the graph cut
            at its conds into pieces compiled separately by Inductor, each a CUDA graph on CUDA,
            one host read of each decision per step; ``lowering/inductor_split.py``,
            docs/cudagraphs.md).
        trace_steps: how many steps of per-block decisions ``stats()`` keeps per request, and in
            all (ring buffer).
        trace_requests: of how many requests (the most recently active) ``stats()`` keeps the
            steps and the state bytes at their end (>= 1; docs/serving.md).
        max_live_requests: at most this many requests hold cache state in one model, each with
            at most this many CFG contexts; one more drops the least recently used, whose next
            step then computes fully (>= 1; docs/serving.md).
        enable_token_merge: insert the token-merge pyramid (``passes/token_merge.py``, FastCache
            v3 token merging) before the block cache.
        token_merge_k: K, neighbours of the k-NN spatial density (>= 1). The token-merge options
            apply with ``enable_token_merge`` only; defaults there: 5, 1.0, 3, 0.5, 4.
        token_merge_lambda: lambda >= 0, weight of the temporal saliency in the importance
            S = rho_sp (1 + lambda rho_tm).
        num_stages: stages the blocks are split into (>= 1; tokens are merged between stages).
        merge_ratio: tokens kept per window from one stage to the next, 0 < r <= 1 (1: identity).
        token_merge_window: side of the square token windows clusters are formed in (>= 1);
            a merge costs O(N * window^2).
        cache_level: what one decision (one ``torch.cond``) covers (``passes/spans.py``): "block"
            (the default: every block its own), "step" (the first ``front_blocks`` and last ``back_blocks``
            blocks always computed, the rest of the stack one span: one decision per step, on
            the change of the front blocks' output, as FirstBlockCache / DBCache) or "span"
            (the middle cut into ``num_spans`` spans of equal depth). A span keeps one anchor
            input and one residual per stream (plus the kind's history), whatever its depth.
        front_blocks: Fn >= 0, leading blocks computed every step at the step and span levels (1).
        back_blocks: Bn >= 0, trailing blocks computed every step at the step and span levels (0).
        num_spans: spans of the middle at ``cache_level="span"`` (>= 1; 2).
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
    motion_threshold: float | None = None
    adaptive_beta: tuple[float, float, float, float] | None = None
    enable_block_approx: bool = True
    warmup_steps: int = 2
    max_consecutive_approx: int | None = None
    approx: str | None = None
    taylor_order: int | None = None
    decision: str | None = None
    error_budget: float | None = None
    target_psnr: float | None = None
    reference: str = "anchor"
    calibration: str | None = None
    rank: int | None = None
    time_buckets: int | None = None
    refit_every: int | None = None
    online_min_samples: int | None = None
    timestep_max: float = 1000.0
    lowering: str = "inductor"
    trace_steps: int = 10000
    trace_requests: int = 64
    max_live_requests: int = 8
    enable_spatial_approx: bool = False
    token_buckets: tuple[float, ...] | None = None
    static_approx: str | None = None
    enable_token_merge: bool = False
    token_merge_k: int | None = None
    token_merge_lambda: float | None = None
    num_stages: int | None = None
    merge_ratio: float | None = None
    token_merge_window: int | None = None
    cache_level: str | None = None
    front_blocks: int | None = None
    back_blocks: int | None = None
    num_spans: int | None = None
    span_sizes: tuple[int, ...] | None = None
    state_dtype: str | None = None
    preset: InitVar[str | None] = None
    rule: InitVar[DecisionConfig | None] = None
    level: InitVar[CacheLevelConfig | None] = None
    maps: InitVar[CalibrationConfig | None] = None
    token_select: InitVar[TokenSelectConfig | None] = None
    token_merge: InitVar[TokenMergeConfig | None] = None

    def __post_init__(self, preset, rule, level, maps, token_select, token_merge) -> None:
        given = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                given[f.name] = check_value(f.name, v)
        groups = {"rule": rule, "level": level, "maps": maps, "token_select": token_select,
                  "token_merge": token_merge}
        for kw, group in groups.items():
            if group is not None:
                self._merge_group(given, kw, group)
        from_preset = set()
        if preset is not None:
            for name, v in preset_options(preset).items():
                if name not in given:
                    given[name] = v
                    from_preset.add(name)
        while True:  # a preset option that a given one makes meaningless yields; two given ones raise
            found = conflicts(given)
            if not found:
                break
            a, b, why = found[0]
            dropped = next((n for n in (a, b) if n in from_preset), None)
            if dropped is None:
                other = f"{b}={given[b]!r}" if b in given else f"{b} not given"
                raise ValueError(f"FastCacheConfig.{a} and FastCacheConfig.{b}: {why} (got {a}={given[a]!r}, {other})")
            del given[dropped]
            from_preset.discard(dropped)
        for f in fields(self):
            object.__setattr__(self, f.name, given.get(f.name))
        derived = self._fill_defaults()
        object.__setattr__(self, "_derived", frozenset(derived))
        object.__setattr__(self, "_preset", preset)
        object.__setattr__(self, "_from_preset", frozenset(from_preset))

    def _merge_group(self, given: dict, kw: str, group) -> None:
        """Add a group's options to ``given``; the same option given flat with another value
        raises (both named)."""
        cls = GROUPS[kw]
        if not isinstance(group, cls):
            raise ValueError(f"FastCacheConfig.{kw}: expected a {cls.__name__}, got {group!r}")
        defaults = {f.name: f.default for f in fields(FastCacheConfig)}
        for name, v in group.flat().items():
            flat = given.get(name)
            if flat is not None and flat != defaults[name] and flat != v:
                raise ValueError(f"FastCacheConfig.{kw} and FastCacheConfig.{name}: {name} given twice, "
                                 f"{v!r} by {cls.__name__} and {flat!r} flat")
            given[name] = v

    def _fill_defaults(self) -> set[str]:
        """Set each unset option that applies to its default (None stays where it does not
        apply); returns the names set."""
        decision = self.decision or ("chi2" if any(getattr(self, n) is not None for n in CHI2_KNOBS) else "output")
        approx = self.approx or "residual"
        level = self.cache_level or "block"
        on = {"chi2": decision == "chi2", "taylor": approx == "taylor", "maps": _calibrated(approx),
              "online": self.calibration == "online", "select": self.enable_spatial_approx,
              "merge": self.enable_token_merge, "spans": level != "block", "span": level == "span"}
        defaults = {"decision": decision, "approx": approx, "cache_level": level, "max_consecutive_approx": 3}
        for name, (when, v) in _APPLIES.items():
            if on[when]:
                defaults[name] = v
        if level == "span" and self.span_sizes is not None:
            defaults["num_spans"] = len(self.span_sizes)
        derived = {n for n, v in defaults.items() if getattr(self, n) is None}
        for n in derived:
            object.__setattr__(self, n, defaults[n])
        derived |= self._resolve_budget()
        return derived

    def _resolve_budget(self) -> set[str]:
        """``error_budget`` from ``target_psnr`` or the decision rule's default; returns the
        names set (``replace`` derives them again)."""
        if self.decision == "chi2":
            return set()
        if self.target_psnr is not None:
            budget = budget_for_psnr(float(self.target_psnr))
            out = {"error_budget"}
            if budget is None:
                import warnings

                warnings.warn(f"fastcache: target_psnr={self.target_psnr} dB is above what the measured relation "
                              f"covers ({MAX_TARGET_PSNR} dB): every block is computed fully", stacklevel=5)
                if self.enable_block_approx:
                    out.add("enable_block_approx")
                object.__setattr__(self, "enable_block_approx", False)
                budget = budget_for_psnr(MAX_TARGET_PSNR)
            object.__setattr__(self, "error_budget", budget)
            return out
        if self.error_budget is None:
            object.__setattr__(self, "error_budget", DEFAULT_OUTPUT_BUDGET if self.decision == "output" else 0.05)
            return {"error_budget"}
        return set()

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
        """Build from ``torch.compile(options=...)`` or keyword arguments (flat names, group
        objects, ``preset``); a ``FastCacheConfig`` with ``kwargs`` is ``replace``d.

        Raises:
            ValueError: an unknown option name (named in the message), a bad value, or two
                options of which one makes the other meaningless (both named).
        """
        if isinstance(options, FastCacheConfig):
            return options.replace(**kwargs) if kwargs else options
        merged = {**dict(options or {}), **kwargs}
        names = {f.name for f in fields(cls)} | {"preset", *GROUPS}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise ValueError(f"FastCacheConfig.{unknown[0]}: unknown option (known: {', '.join(sorted(names))})")
        return cls(**merged)

    def replace(self, **kwargs: Any) -> "FastCacheConfig":
        """A copy with some options changed (validated again). Options this config derived
        (defaults, the budget of ``target_psnr``) and its preset's options are derived again, so
        ``replace(cache_level="block")`` of a step-level config drops its default front block."""
        skip = self._derived | self._from_preset
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if self._preset is not None:
            d["preset"] = self._preset
        d.update(kwargs)
        return FastCacheConfig.from_options(d)

    def to_dict(self) -> dict:
        """JSON-friendly dict of every option (for manifests and reports)."""
        return asdict(self)
