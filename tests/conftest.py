import pytest
import torch


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
