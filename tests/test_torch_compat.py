"""fastcache_fx.torch_compat: the one home of private torch internals (docs/torch-and-gpu.md).
On a torch of the supported range every internal is there; where one is missing, its fallback
keeps results right."""

import importlib
import sys
import warnings

import pytest
import torch

from fastcache_fx import torch_compat as C


def test_version_range():
    assert C.torch_version("2.13.0+cpu") == (2, 13)
    assert C.in_supported_range("2.11.0") and C.in_supported_range("2.15.1")
    assert not C.in_supported_range("2.10.2") and not C.in_supported_range("2.16.0")


def test_pyproject_declares_the_range():
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    (lo, hi), = [((C.SUPPORTED[0]), C.SUPPORTED[1])]
    assert f"torch>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}" in deps


@pytest.mark.skipif(not C.in_supported_range(), reason="torch outside the supported range")
def test_every_internal_present():
    missing = [k for k, ok in C.probe().items() if not ok]
    assert not missing, f"torch {torch.__version__} lacks {missing}: update fastcache_fx/torch_compat.py"


def test_traced_code_outside_a_backend_is_none():
    assert C.traced_code() is None


def test_traced_code_inside_a_backend():
    seen = []

    def backend(gm, example_inputs, **_):
        seen.append(C.traced_code())
        return gm.forward

    class Block(torch.nn.Module):
        def forward(self, x):
            return x * 2

    torch.compiler.reset()
    torch.compile(Block(), backend=backend)(torch.ones(2))
    assert seen and seen[0].co_name == "forward"


def test_force_contiguous_and_its_fallback(monkeypatch):
    x = torch.randn(3, 4).t()
    y = C.force_contiguous(x)
    assert y.is_contiguous() and torch.equal(x, y)
    # the prim's module gone (a torch that moved it): plain .contiguous()
    monkeypatch.setitem(sys.modules, "torch._prims_common", None)
    y = C.force_contiguous(x)
    assert y.is_contiguous() and torch.equal(x, y)


def test_disallow_in_graph_fallback(monkeypatch):
    class NotAllowed(torch.nn.Module):
        pass

    assert C.disallow_in_graph_if_allowed(NotAllowed) is False
    monkeypatch.setattr(C, "_allowed_callable_ids", lambda: None)
    assert C.disallow_in_graph_if_allowed(NotAllowed) is False  # asks by calling, catches the refusal


def test_missing_internals_fall_back(monkeypatch):
    monkeypatch.delattr(torch._dynamo.config, "ignore_logging_functions", raising=False)
    assert C.ignore_logging_function(print) is False
    monkeypatch.setitem(sys.modules, "torch._C._dynamo.eval_frame", None)
    assert C.reset_frame_strategy((lambda: 0).__code__) is False
    monkeypatch.setitem(sys.modules, "torch.fx.node", None)
    assert C.qualified_name(torch.add).endswith("add")
    assert C.process_group_size("no-such-group") is None


def test_outside_range_warns(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    with pytest.warns(UserWarning, match="2.11"):
        C.warn_if_unsupported()
    monkeypatch.setattr(torch, "__version__", "2.13.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C.warn_if_unsupported()
