"""The installed library needs only torch, diffusers, scipy, numpy and safetensors (pyproject's
dependencies): importing it and compiling a diffusers DiT with the backend never imports the
demo's dependencies (scikit-learn, matplotlib, transformers; the ``demo`` extra). Checked in a
subprocess in which those packages cannot be imported (``sys.modules[name] = None``), and peft,
which needs transformers: every module imports (default tier); a tiny DiT compiles and runs with
the backend (slow tier)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastcache_fx

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("sklearn", "matplotlib", "transformers", "peft")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError; find_spec says it is not installed
import torch
import fastcache_fx
from diffusers import DiTTransformer2DModel

torch.manual_seed(0)
model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                              sample_size=8, patch_size=2, norm_num_groups=1, num_embeds_ada_norm=10).eval()
compiled = torch.compile(model, backend="fastcache", options={{"preset": "balanced"}})
x = torch.randn(1, 4, 8, 8)
with torch.no_grad():
    for t in (900, 800):
        compiled(x, timestep=torch.tensor([t]), class_labels=torch.tensor([1]))
st = fastcache_fx.stats(compiled)
assert st.steps == 2 and st.graphs == 1 and not st.fallback, st
print("lean ok", fastcache_fx.__version__)
"""


BLOCK = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
"""

#: every module of the package imports (their heavy imports are inside functions)
IMPORT_ALL = BLOCK + """
import pkgutil
import fastcache_fx
for m in pkgutil.walk_packages(fastcache_fx.__path__, "fastcache_fx."):
    __import__(m.name)
print("imports ok")
"""


def _run(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_every_module_imports_without_the_demo_dependencies():
    assert "imports ok" in _run(IMPORT_ALL)


@pytest.mark.slow
def test_library_compiles_a_dit_without_the_demo_dependencies():
    assert f"lean ok {fastcache_fx.__version__}" in _run(SCRIPT)


def test_pyproject_keeps_the_demo_dependencies_in_the_demo_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(meta["dependencies"])
    for name in ("scikit-learn", "matplotlib", "transformers", "tqdm"):
        assert name not in core and any(d.startswith(name) for d in meta["optional-dependencies"]["demo"])
    assert "fastcache-fx[demo]" in meta["optional-dependencies"]["test"]
    assert meta["version"] == fastcache_fx.__version__


def test_cli_names_the_demo_extra_when_its_packages_are_missing(monkeypatch, capsys):
    from fastcache_fx import cli, demo

    def run(args):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(demo, "run", run)
    assert cli.main(["demo"]) == 2
    assert 'pip install "fastcache-fx[demo]"' in capsys.readouterr().err
