"""The block cache under xDiT (xfuser) sequence parallelism: 2 gloo processes on this CPU run the
tiny Flux through xDiT's Ulysses / ring wrapper, and every rank takes the branch one process
takes on the whole sequence (issue: many devices, item 4). Needs the ``xdit`` extra."""

import importlib.util
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import assert_parallel_equals_one_process

HERE = os.path.dirname(os.path.abspath(__file__))

# not pytest.importorskip("xfuser"): on a machine without a GPU `import xfuser` raises
# NotImplementedError, not ImportError (the worker imports it with shims, in its own processes)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("xfuser") is None,
                                reason="xfuser (xDiT) is not installed: pip install -e '.[xdit]'")

TIMEOUT_S = 480


def _run_worker(layout: str, tmp_path) -> dict:
    out = tmp_path / f"{layout}.pt"
    # own session, so that on a timeout the spawned ranks are killed with their parent
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "xdit_worker.py"), layout, str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # a hang (ranks taking different branches, so one waits in a collective) fails here
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"xDiT {layout} workers did not finish within {TIMEOUT_S} s:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("layout", ["ulysses", "ring"])
def test_xdit_decisions_equal_one_process(layout, tmp_path):
    """xDiT's xFuserFlux1Transformer2DWrapper (Flux, double + single blocks) under Ulysses 2 and
    ring 2 (16 image and 6 text tokens: both divisible by the degree, so both are sharded)."""
    res = _run_worker(layout, tmp_path)
    sp, single = res["sp"], res["single"]
    assert sp["split_text"]
    # the decision sums are all-reduced over every group of the graph's collectives: the one
    # of the attention exchange (yunchang's Ulysses all-to-all / the ring's) and xDiT's
    # sequence-parallel group (the output all-gather); each spans both ranks here
    (groups,) = sp["groups"]
    kinds = {k for g in groups for k in g["is"]}
    assert ("ulysses" if layout == "ulysses" else "ring") in kinds and "sp" in kinds
    assert all(g["ranks"] == [0, 1] for g in groups)
    assert_parallel_equals_one_process(sp, single)
    # and the same delta: the sums over the groups compose to the whole sequence (a stream
    # counted twice on some rank would shift delta without necessarily flipping a decision)
    for a, b in zip(sp["on_delta"], single["on_delta"]):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
