"""The conformance check shared by tests/test_conformance_image.py and _video.py (one module per
pytest worker): ``zoo_classes.check`` on each class, batch 1, and what must hold."""

import torch

from fastcache_fx import zoo_classes

# Inductor vs eager on these tiny fp32 models: ~1e-6 relative; a block computed wrongly or
# skipped gives > 1e-2
TOL = 1e-4


def names(kind: str) -> list:
    return [n for n, s in sorted(zoo_classes.SPECS.items()) if s.kind == kind]


def assert_conforms(name: str) -> dict:
    torch._dynamo.reset()  # classes share diffusers' wrapper code objects: stay under the recompile limit
    row = zoo_classes.check(name)
    assert row["fallback"] == [], row["fallback"]
    assert "fastcache" in row["graphs"] and "fallback" not in row["graphs"], row["graphs"]
    assert row["blocks"] >= 1, row
    assert row["off_rel_err"] < TOL, row
    assert row["approx_ratio"] > 0 and row["finite"], row
    # the approximation changed the output: the cache acted (tiny random models move far per step)
    assert row["live_rel_err"] > 10 * max(row["off_rel_err"], 1e-7), row
    return row
