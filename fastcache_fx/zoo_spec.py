"""The schema of the conformance zoo: one ``ClassSpec`` per diffusers transformer class, kept in
``SPECS`` by the spec modules (zoo_specs_image, zoo_specs_recent, zoo_specs_video) and read by
``zoo_classes``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass(frozen=True)
class ClassSpec:
    """One diffusers transformer class with a tiny config.

    Attributes:
        cls: the class name exported by ``diffusers``.
        kind: "image" or "video".
        init: the constructor kwargs (a tiny config).
        inputs: (batch B, torch.Generator) -> forward kwargs, the timestep included.
        timestep: the name of the timestep input (a [B] tensor).
        t_max: the timestep at the start of a trajectory (1000 for models fed train timesteps,
            1.0 for those fed sigmas / flow times).
        latent: the name of the noisy-latent input.
        rising: the pipeline feeds a timestep that rises over the trajectory (Lumina, Lumina 2,
            Z-Image pass 1 - sigma): the scripted trajectories rise from ``t_max / steps`` to ``t_max``.
        note: why the config differs from diffusers' test config, or what the class needs.
        dynamo: ``torch._dynamo.config`` settings a direct ``torch.compile`` needs
            (``enable_fastcache`` sets them itself).
        inductor: ``torch._inductor.config`` settings the check compiles under.
        enable: the class needs ``enable_fastcache`` (it prepares the model before compiling).
    """

    cls: str
    kind: str
    init: dict
    inputs: Callable[[int, torch.Generator], dict]
    timestep: str = "timestep"
    t_max: float = 1000.0
    latent: str = "hidden_states"
    rising: bool = False
    note: str = ""
    dynamo: dict = field(default_factory=dict)
    enable: bool = False
    inductor: dict = field(default_factory=dict)


def scripted_timestep(spec: ClassSpec, k: int, steps: int) -> float:
    """The timestep of step ``k`` of a scripted ``steps``-step trajectory: falling linearly from
    ``t_max`` to ``t_max / steps``, or rising from ``t_max / steps`` to ``t_max`` (``rising``)."""
    return spec.t_max * ((k + 1) if spec.rising else (steps - k)) / steps


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    """A [*shape] standard-normal tensor drawn from ``g``."""
    return torch.randn(*shape, generator=g)


def timesteps(g: torch.Generator, b: int, t_max: float = 1000.0) -> torch.Tensor:
    """[b] timesteps drawn uniformly from [0, t_max)."""
    return torch.rand(b, generator=g) * t_max


SPECS: dict[str, ClassSpec] = {}


def register(*specs: ClassSpec) -> None:
    """Add ``specs`` to ``SPECS`` under their class names."""
    for s in specs:
        SPECS[s.cls] = s
