import os

if os.environ.get("PYTEST_XDIST_WORKER"):  # 2 workers on 2 cores: one thread each (OpenMP spin-waits otherwise)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def hooked_dit_call(model, x, labels, t, replace=None):
    """(model output, [(input, output)] per block) of one eager call of a DiT at timestep ``t``;
    ``replace``: {block index: fn(input, output) -> the output to continue with}."""
    rec = []

    def hook(i):
        def fn(mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            rec.append((h.detach().clone(), out.detach().clone()))
            return replace[i](h, out) if replace and i in replace else None
        return fn

    hs = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(model.transformer_blocks)]
    try:
        out = model(x, timestep=torch.full((x.shape[0],), t), class_labels=labels).sample
    finally:
        for h in hs:
            h.remove()
    return out, rec


def dynamo_graph(model, kwargs):
    """(Dynamo's graph of ``model(**kwargs)``, its example inputs), captured without compiling."""
    cap = {}

    def backend(gm, example_inputs, **_):
        cap["gm"], cap["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    return cap["gm"], cap["inputs"]


def assert_parallel_equals_one_process(par: dict, single: dict) -> None:
    """The checks shared by the context-parallel and xDiT tests (``cp_worker.trajectories``):
    approximation off, each step equals one process; approximation on, the same decisions as one
    process on the whole sequence, on every rank, including step 4, where only rank 1's shard
    changes (rank 0 alone would approximate), and the same outputs."""
    assert not any(any(r) for r in par["off_trace"])
    for a, b in zip(par["off"], single["off"]):
        assert rel_err(a, b) < 1e-5
    assert par["on_trace"] == single["on_trace"]
    assert par["traces_of_ranks"][0] == par["traces_of_ranks"][1] == par["on_trace"]
    assert any(all(r) for r in par["on_trace"]) and not any(par["on_trace"][4])
    for a, b in zip(par["on"], single["on"]):
        assert rel_err(a, b) < 1e-5

