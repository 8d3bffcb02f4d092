"""Presets: ``FastCacheConfig(preset="quality" | "balanced" | "fast")``, each a set of options
chosen from the measured results (benchmarks/RESULTS.md). Options given beside a preset
override it; a preset option that a given option makes meaningless is left out (e.g.
``preset="fast", decision="chi2"`` drops the preset's ``error_budget``).

Speed is against plain Inductor in the same run, PSNR against Inductor's images of the same
seeds; models: the bundled DiT (6 blocks), MMDiT (SD3 class), the unseen DiT (8 blocks, not
tuned on) and the Wan 2.1-type video model (2-core CPU, ``benchmarks/compare.py``).

``"quality"``: block level, output budget 0.25. RESULTS.md "The cache levels against the peers on
three models" (2026-12-05, commit a32e92a; rows "output budget (default rule), error_budget=0.25"):
DiT 1.55x at 44.1 dB, MMDiT 1.19x at 42.7 dB, unseen DiT 1.96x at 38.8 dB; Wan ("Video reference
model", run 1, block level 0.25): 1.22x at 29.0 dB. The block level's budget means about the same
on the three image models, so ``target_psnr`` (whose relation was measured there) combines with it.
The step level with an order-2 span forecast at budget 0.25 measured higher PSNR in another run
("Order 2 against the peers": DiT 1.83x at 49.3 dB, MMDiT 1.53x at 45.2 dB, unseen DiT 1.95x at 41.9
dB) but its budget means less from model to model ("No front block"), so it is not the preset.

``"balanced"``: today's default, block level, output budget 0.5 (the same section and run): DiT
2.02x at 41.7 dB, MMDiT 1.59x at 38.1 dB, unseen DiT 2.39x at 37.9 dB; Wan 1.73x at 26.3 dB.

``"fast"``: ``cache_level="step", front_blocks=0, approx="taylor", taylor_order=2,
max_consecutive_approx=8``, output budget 0.5: one decision per step on the change of the stack's
input, the whole stack's residual forecast. RESULTS.md "No front block: the whole stack as one
span" (2026-12-06, one run per model, the block-level default in the same run): MMDiT 2.26x at 44.7
dB (default 1.92x at 38.1 dB), unseen DiT 3.08x at 36.5 dB (default 2.06x at 37.9 dB), Wan 1.31x at
22.7 dB (default 1.28x at 26.3 dB). Larger budgets are faster on the bundled models (DiT budget 1:
3.58x at 37.8 dB, 2: 4.92x at 37.4 dB) but fell to 26-27 dB on the unseen DiT, so the preset keeps
0.5; set ``error_budget`` (or use ``tune``) on your own pipeline for more.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    "quality": {"decision": "output", "error_budget": 0.25, "cache_level": "block"},
    "balanced": {"decision": "output", "error_budget": 0.5, "cache_level": "block"},
    "fast": {"decision": "output", "error_budget": 0.5, "cache_level": "step", "front_blocks": 0, "approx": "taylor",
             "taylor_order": 2, "max_consecutive_approx": 8},
}


def preset_options(name: str) -> dict:
    """The options of preset ``name`` (a copy).

    Raises:
        ValueError: an unknown name (``FastCacheConfig.preset`` and the known names in the message).
    """
    if name not in PRESETS:
        raise ValueError(f"FastCacheConfig.preset: expected one of {tuple(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])
