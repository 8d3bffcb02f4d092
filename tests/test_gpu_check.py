"""benchmarks/gpu_check.py's plumbing on CPU (``--device cpu --smoke``): every section writes its
rows to the output folder as JSON lines, correctness compares every step's decisions with the
CPU trace in the repository, errors are short rows, the deadline skips in one row each."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_one_error_row(tmp_path):
    assert _load("gpu_check").main(["--out", str(tmp_path)]) == 2
    (row,) = _rows(tmp_path)
    assert row["status"] == "error" and "no CUDA device" in row["error"]


def test_rows_deadline_and_short_errors(tmp_path):
    R = _load("gpu_check_rows")
    rows = R.Rows(tmp_path, deadline_s=100.0)

    def boom():
        def deep(n):
            return deep(n - 1) if n else 1 / 0
        deep(30)

    assert rows.run("a", boom, need_s=1) is False
    assert rows.run("b", lambda: rows.write(x=1), need_s=1e6) is False  # skipped: the deadline
    got = _rows(tmp_path)
    assert [r["section"] for r in got] == ["a", "b"]
    assert got[0]["status"] == "error" and "ZeroDivisionError" in got[0]["error"] and len(got[0]["error"]) <= 600
    assert got[1]["status"] == "skipped" and "deadline" in got[1]["reason"]


def test_compare_decisions_counts_every_step():
    G = _load("gpu_check")
    ref = {"approx": [[False, False], [True, False], [True, True]], "delta": [[0, 0], [0.5, 2.0], [0.5, 1.0]],
           "threshold": [[1, 1], [1, 1], [1, 1]]}
    same = G.compare_decisions({"approx": [list(a) for a in ref["approx"]]}, ref)
    assert same["decisions_equal"] and same["steps_compared"] == 3
    # a late step differs: once far from the threshold, once within 1 % of it (numerics)
    got = {"approx": [[False, False], [True, False], [True, False]]}
    c = G.compare_decisions(got, ref)
    assert not c["decisions_equal"] and c["mismatches"] == 0 and c["mismatches_near_threshold"] == 1
    assert c["first_mismatch_step"] == 2
    got = {"approx": [[False, False], [False, False], [True, True]]}
    assert G.compare_decisions(got, ref)["mismatches"] == 1


@pytest.mark.slow
def test_smoke_on_cpu(tmp_path):
    """The whole check on CPU with tiny configurations; the reference DiT's decisions equal the
    recorded CPU trace (same device, same numerics) and the all-approximated rows approximate."""
    G = _load("gpu_check")
    # a deadline no CPU run reaches: a slow CI machine must not skip the sections under test
    rc = G.main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--deadline", "3600"])
    rows = _rows(tmp_path)
    errors = [r for r in rows if r.get("status") == "error"]
    assert rc == 0 and not errors, errors
    by = {(r["section"], r.get("variant")): r for r in rows}
    pre = by[("preflight", None)]
    assert pre["torch"] == torch.__version__ and pre["torch_internals_missing"] == []
    corr = by[("correctness", None)]
    assert corr["decisions_equal"] and corr["steps_compared"] == corr["steps_ref"] == 8
    assert corr["psnr_vs_cpu_cached_db"] > 60
    for v in ("inductor", "fastcache block all-full", "fastcache block all-approx", "fastcache step all-approx",
              "fbcache all-full", "fbcache all-approx"):
        assert by[("flux", v)]["step_ms"] > 0 and by[("flux", v)]["finite"], v
    assert by[("flux", "fastcache block all-approx")]["block_approx_ratio"] > 0.5
    assert by[("flux", "fastcache block all-full")]["block_approx_ratio"] == 0.0
    assert by[("flux", "fastcache block all-full")]["state_bytes"] > 0
    assert by[("flux", "tensorrt")]["status"] == "skipped"
    assert "extrapolated_57_blocks_ms" in by[("flux", "fastcache block all-full")]
    aoti = by[("aotinductor", None)]
    assert aoti["same_decisions_as_in_process"] and aoti["package_mb"] > 0
    quant = [r for r in rows if r["section"] == "quantized"]
    if quant and quant[0].get("status") != "skipped":  # torchao installed: the int8 row
        q = quant[0]
        assert q["config"] == "int8_weight_only" and q["fallback"] == [] and q["finite"], q
        assert q["off_max_rel_err_vs_inductor"] < 1e-4 and q["block_approx_ratio"] > 0, q
    assert rows[-1]["status"] == "done"
