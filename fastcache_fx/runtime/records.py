"""The per-step decision record every runtime keeps for ``stats()``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One step of one context: tensors as the graph returned them (read lazily by stats())."""

    context: str
    step: torch.Tensor
    delta: torch.Tensor
    threshold: torch.Tensor
    approx: torch.Tensor
    seq: int = field(default_factory=lambda: next(_SEQ))  # call order across the model's graphs
    output_error: torch.Tensor | None = None  # decision="output": the step's predicted output error


_SEQ = itertools.count()
