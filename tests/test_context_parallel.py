"""The block cache under diffusers context parallelism: 2 gloo processes on this CPU, every
rank takes the branch one process takes on the whole sequence (issue: many devices)."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_parallel_equals_one_process, dynamo_graph

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_worker(family: str, tmp_path) -> dict:
    out = tmp_path / f"{family}.pt"
    # a hang (ranks disagreeing on a branch, so one waits in a collective) fails here
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cp_worker.py"), family, str(out)],
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_ulysses_decisions_equal_one_process(family, tmp_path):
    """Flux (double + single blocks) and an MMDiT with joint blocks (QwenImage: diffusers' SD3
    class has no context-parallel attention, see README "Multiple devices") under Ulysses 2."""
    res = _run_worker(family, tmp_path)
    cp, single = res["cp"], res["single"]
    assert cp["groups"] == [["0"]]  # the decision sums are all-reduced over the CP group
    assert_parallel_equals_one_process(cp, single)


def test_token_passes_refused_under_context_parallelism():
    from fastcache_fx import zoo
    from fastcache_fx.backend import plan
    from fastcache_fx.config import FastCacheConfig

    model, kw = zoo.build("dit")
    gm, inputs = dynamo_graph(model, kw)
    # a functional collective in the graph is what context parallelism leaves there
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(out):
        gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", "0"))
    for opt in ("enable_spatial_approx", "enable_token_merge"):
        with pytest.raises(ValueError, match=f"{opt}.*context parallelism"):
            plan(gm, inputs, FastCacheConfig(**{opt: True}), None)
    assert plan(gm, inputs, FastCacheConfig(), None).regions  # the block cache itself is fine
