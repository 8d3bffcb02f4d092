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


def dynamo_graph(model, kwargs):
    """(Dynamo's graph of ``model(**kwargs)``, its example inputs), captured without compiling."""
    cap = {}

    def backend(gm, example_inputs, **_):
        cap["gm"], cap["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    return cap["gm"], cap["inputs"]
