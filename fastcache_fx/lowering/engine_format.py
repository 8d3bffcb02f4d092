"""How the pieces of a split graph are lowered, saved and loaded back (``export(format="tensorrt")``:
Torch-TensorRT engines, ``lowering.tensorrt.TensorRTFormat``; plain ``torch.export`` programs here)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import fx


class EngineFormat:
    """How split pieces are lowered, saved and loaded back (``format="tensorrt"``).

    ``compile(gm, example_inputs, name)`` -> engine; ``save(engine, gm, example_inputs, path)``;
    the loader calls ``torch.export.load(path).module()`` after importing ``requires``.
    """

    name = "torch.export"
    requires: tuple[str, ...] = ()

    def compile(self, gm: fx.GraphModule, example_inputs: list, name: str):
        ep = torch.export.export(gm, tuple(example_inputs), strict=False)
        engine = ep.module()
        engine._fastcache_program = ep  # saved as is (no second export)
        return engine

    def save(self, engine, gm: fx.GraphModule, example_inputs: list, path: Path) -> None:
        ep = getattr(engine, "_fastcache_program", None)
        if ep is None:
            ep = torch.export.export(gm, tuple(example_inputs), strict=False)
        torch.export.save(ep, str(path))
