"""The conformance check shared by tests/test_conformance_image.py and _video.py (one module per
pytest worker): ``zoo_conformance.check_rule`` on a class under a rule (the default options, the
fast setting) through an entry point (bare ``torch.compile``, ``enable_fastcache``), and what must
hold (docs/supported-models.md is the table of the same check)."""

import pytest
import torch

from fastcache_fx import zoo_classes, zoo_conformance

# compiled vs the eager replay of its decisions with the cached residuals: Inductor's own numerics on
# these tiny fp32 models ~1e-6; a wrong or stale residual, a skipped block: > 1e-2
TOL = 1e-3

#: one class per structural kind (the default test tier's candidates; the lead sets the tiers)
KINDS = {
    "single stream": "PixArtTransformer2DModel",
    "joint": "SD3Transformer2DModel",
    "double + single lists": "FluxTransformer2DModel",
    "refiner lists": "ZImageTransformer2DModel",
    "video with rotary": "WanTransformer3DModel",
    "graph break": "MochiTransformer3DModel",
}


def names(kind: str) -> list:
    return [n for n, s in sorted(zoo_classes.SPECS.items()) if s.kind == kind]


def cells(kind: str) -> list:
    """pytest params (class, rule, entry) of ``kind``: every class under the default options
    through a bare ``torch.compile``, and the ``KINDS`` classes under both rules through both entry
    points (the whole class x rule x entry table is benchmarks/conformance.py). The KINDS classes'
    default / bare cells are the default tier (one per structural kind), the others the slow tier;
    the cells measured to fail carry their reason (``KNOWN``)."""
    reps = set(KINDS.values())
    out = []
    for n in names(kind):
        for r in zoo_conformance.RULES:
            for e in zoo_conformance.ENTRIES:
                first = (r, e) == ("default", "backend")
                if not first and n not in reps and (n, r, e) not in EXTRA:
                    continue
                marks = [] if first and n in reps else [pytest.mark.slow]
                if (n, r, e) in KNOWN:
                    marks.append(pytest.mark.xfail(reason=KNOWN[n, r, e], strict=False))
                out.append(pytest.param(n, r, e, marks=marks, id=f"{n}-{r}-{e}"))
    return out


#: more cells of the slow tier: the bare backend hands HiDream's and HunyuanVideo 1.5's blocks over
#: one graph per block, where the fast rule's step level is served at the block level; Wan VACE's
#: control block feeds the glue after the main block, so the step level keeps one span per list
EXTRA = {("HiDreamImageTransformer2DModel", "fast", "backend"), ("HunyuanVideo15Transformer3DModel", "fast", "backend"),
         ("WanVACETransformer3DModel", "fast", "backend")}

#: cells measured to fail (class, rule, entry) -> why; listed in docs/supported-models.md
KNOWN: dict = {}


def assert_conforms(name: str, rule: str = "default", entry: str = "backend") -> dict:
    torch._dynamo.reset()  # classes share diffusers' wrapper code objects: stay under the recompile limit
    row = zoo_conformance.check_rule(name, rule, entry)
    assert row["fallback"] == [], row["fallback"]
    assert "fallback" not in row["graphs"], row["graphs"]
    assert row["per_list"], row
    # every block list approximated at least once on the trajectory, or refused with the one known
    # reason (its stream input never changed: the output rule cannot bound its error)
    assert all(v > 0 or lst in row["refused"] for lst, v in row["per_list"].items()), row["per_list"]
    assert all(row["per_list"][lst] <= 0 for lst in row["refused"]), row["refused"]
    # every step, approximated ones included, equals the eager model with the approximated blocks'
    # outputs replaced by their input plus the cached residual (or its Taylor forecast)
    assert row["replay_rel_err"] < TOL, row
    assert row["finite"], row
    return row
