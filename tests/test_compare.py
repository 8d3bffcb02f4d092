"""The peer benchmark harness (benchmarks/compare.py): a tiny run and its metrics."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """2 samples, 4 steps, inductor and fastcache: what the harness writes."""
    d = tmp_path_factory.mktemp("compare")
    md = d / "RESULTS.md"
    md.write_text("# Benchmark results\n\n<!-- BEGIN other -->\nkeep me\n<!-- END other -->\n\n"
                  "<!-- BEGIN compare -->\nold text\n<!-- END compare -->\ntrailer\n")
    rc = compare.main(["--suites", "1", "--samples", "2", "--steps", "4",
                       "--methods", "inductor,fastcache,fastcache_taylor_error", "--sweep-fastcache", "0.5",
                       "--sweep-fastcache-taylor-error", "0.5",
                       "--out-json", str(d / "c.json"), "--out-png", str(d / "c.png"),
                       "--results-md", str(md), "--no-progress"])
    assert rc == 0
    return d, json.loads((d / "c.json").read_text()), md.read_text()


def test_tiny_run_json_is_well_formed(tiny_run):
    d, rec, _ = tiny_run
    s1 = rec["suite1"]
    assert (s1["samples"], s1["steps"]) == (2, 4)
    assert [r["label"] for r in s1["rows"]] == ["torch.compile (Inductor)", "fastcache chi2, cache_ratio_threshold=0.5",
                                                "fastcache taylor-1 + error rule, error_budget=0.5"]
    assert s1["rows"][2]["options"] == {"approx": "taylor", "decision": "error", "error_budget": 0.5}
    for r in s1["rows"]:
        assert r["status"] == "ok", r
        assert r["seconds_per_image"] > 0 and r["speedup"] > 0 and r["compiled"]
        assert 0 <= r["class_accuracy"] <= 1 and math.isfinite(r["digits_fid"])
        assert -1 <= r["ssim"] <= 1
    base = s1["rows"][0]
    assert base["speedup"] == 1.0 and base["psnr_db"] == compare.PSNR_CAP and base["ssim"] == pytest.approx(1.0)
    for r in s1["rows"][1:]:
        trace = np.asarray(r["trace"])
        assert trace.shape == (4, 6)  # steps x blocks of the reference DiT
        assert r["approx_ratio"] == pytest.approx(trace.mean())
    assert rec["meta"]["machine"]["cores"] >= 1 and rec["meta"]["commit"]
    assert (d / "c.png").stat().st_size > 1000


def test_tiny_run_table_and_results_section(tiny_run):
    _, rec, md = tiny_run
    table = compare.suite1_table(rec["suite1"]).splitlines()
    assert len(table) == 2 + 3 and all(line.count("|") == 10 for line in table)
    # only the compare section was rewritten
    assert "keep me" in md and "old text" not in md and md.rstrip().endswith("trailer")
    section = md.split(compare.BEGIN)[1].split(compare.END)[0]
    assert "fastcache chi2, cache_ratio_threshold=0.5" in section and "Target 1" in section
    assert "--samples 2 --steps 4" in section and "c.png" in section


def test_frontier_keeps_the_rows_nothing_beats():
    rows = [{"speedup": 2.0, "psnr_db": 40.0}, {"speedup": 1.5, "psnr_db": 45.0}, {"speedup": 1.4, "psnr_db": 42.0},
            {"speedup": 3.0, "psnr_db": 30.0}, {"speedup": 1.9, "psnr_db": 39.0}]
    assert compare.frontier(rows) == [rows[3], rows[0], rows[1]]


def test_psnr_of_a_constant_offset():
    a = torch.zeros(3, 1, 8, 8)
    for off in (0.01, 0.1, 0.5):
        # MSE = off^2, data range 2: PSNR = 10 log10(4 / off^2)
        assert compare.psnr_db(a + off, a) == pytest.approx(10 * math.log10(4 / off ** 2), rel=1e-6)  # float32 a + off
    assert compare.psnr_db(a, a) == compare.PSNR_CAP


def _ssim_numpy(x: np.ndarray, y: np.ndarray, win: int = 7, data_range: float = 2.0) -> float:
    """Wang et al. 2004 eq. 13 written out window by window (uniform window, unbiased covariances)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win].ravel(), y[i:i + win, j:j + win].ravel()
            ma, mb = a.mean(), b.mean()
            va, vb = a.var(ddof=1), b.var(ddof=1)
            cab = ((a - ma) * (b - mb)).sum() / (a.size - 1)
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_identical_and_known_pair():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    assert compare.ssim_mean(x, x) == pytest.approx(1.0, abs=1e-12)
    y = (x + 0.3 * torch.randn(1, 1, 8, 8, generator=g)).clamp(-1, 1)
    expected = _ssim_numpy(x[0, 0].double().numpy(), y[0, 0].double().numpy())
    assert compare.ssim_mean(y, x) == pytest.approx(expected, rel=1e-9)
    assert expected < 0.95  # the pair is really different
    # constant images: the structure term is (c2)/(c2) = 1, luminance (2 mu_a mu_b + c1)/(mu_a^2 + mu_b^2 + c1)
    a, b = torch.full((1, 1, 8, 8), 0.5), torch.full((1, 1, 8, 8), -0.5)
    c1 = (0.01 * 2) ** 2
    assert compare.ssim_mean(a, b) == pytest.approx((2 * 0.5 * -0.5 + c1) / (0.25 + 0.25 + c1), rel=1e-9)


def test_verdict_reads_the_rows():
    def row(m, s, p):
        return {"method": m, "label": f"{m} {s}", "status": "ok", "speedup": s, "psnr_db": p}

    rows = [row("fastcache", 2.5, 35.0), row("fbcache", 1.5, 33.0), row("magcache", 3.0, 31.0)]
    v = compare.verdict({"rows": rows})
    assert v[0].startswith("Target 1 met") and "2.50x" in v[0]
    assert v[1].startswith("Target 2 NOT met") and "magcache" in v[1] and "fbcache 1.5" not in v[1]
    v = compare.verdict({"rows": [row("fastcache", 1.5, 35.0), row("fastcache", 3.0, 20.0)]})
    assert v[0].startswith("Target 1 NOT met") and v[1].startswith("Target 2 met")


def test_trace_subsampling_keeps_ends():
    tr = [[i % 2 == 0] * 3 for i in range(50)]
    rows = compare.subsample_rows(tr, 10)
    assert len(rows) == 10 and rows[0] == tr[0] and rows[-1] == tr[49]


def test_bad_flags_raise():
    with pytest.raises(ValueError, match="--methods"):
        compare.main(["--suites", "1", "--methods", "inductor,nope"])
    with pytest.raises(ValueError, match="--suites"):
        compare.main(["--suites", "3"])
