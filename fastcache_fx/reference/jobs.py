"""One interface to the bundled reference models for the demo and the benchmarks.

``job("dit")``: the class-conditional DiT (``DiTTransformer2DModel``, v-prediction, DDIM, 8x8
pixels, 64 tokens), sampled by ``sampling.sample``.
``job("mmdit")``: the flow-matching MMDiT (``SD3Transformer2DModel``, 16x16 pixels, 64 image
tokens + 4 class tokens), sampled by the real ``StableDiffusion3Pipeline`` (``mmdit_sampling``);
its 16x16 samples are average-pooled 2x2 to 8x8 for the digit classifier (class accuracy,
digits-FID).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

MODELS = ("dit", "mmdit")


@dataclass(frozen=True)
class ReferenceJob:
    """How to load, compile, sample and score one bundled model.

    Attributes:
        name: "dit" or "mmdit".
        title: a short human description (plots, tables).
        steps, guidance: default denoising steps and CFG scale.
        schedulers: accepted scheduler names, the first is the default.
        image_size: side of the generated images in pixels (8 or 16).
        timestep_max: the largest timestep the sampler passes to the transformer (1000 for both).
        pipeline: True when sampling runs a diffusers pipeline (fastcache is then enabled with
            ``fastcache_fx.enable_fastcache(pipe)``).
    """

    name: str
    title: str
    steps: int
    guidance: float
    schedulers: tuple[str, ...]
    image_size: int
    timestep_max: float
    pipeline: bool
    _load: Callable[[], torch.nn.Module]
    _sample: Callable[..., torch.Tensor]

    def load(self) -> torch.nn.Module:
        """A new copy of the bundled transformer (eval, fp32, CPU): each copy has its own cache state."""
        return self._load()

    def check_scheduler(self, scheduler: str | None) -> str:
        """``scheduler`` or the default; ValueError naming ``scheduler`` if this model has no such sampler."""
        if scheduler is None:
            return self.schedulers[0]
        if scheduler not in self.schedulers:
            raise ValueError(f"scheduler: model {self.name!r} accepts {self.schedulers}, got {scheduler!r}")
        return scheduler

    def sample(self, transformer, labels: Sequence[int] | torch.Tensor, *, steps: int | None = None,
               guidance: float | None = None, seeds: Sequence[int] | int = 0, scheduler: str | None = None,
               progress: bool = False, callback=None) -> torch.Tensor:
        """Images [B, 1, image_size, image_size] in [-1, 1] for classes ``labels`` [B] (one seed per
        sample; per-sample noise, so a sample does not depend on the batch).

        ``transformer``: the eager model, a compiled one, or what ``fastcache`` returned.
        Raises ValueError for bad labels, steps, seeds or scheduler (named)."""
        return self._sample(transformer, labels, steps=self.steps if steps is None else steps,
                            guidance=self.guidance if guidance is None else guidance, seeds=seeds,
                            scheduler=self.check_scheduler(scheduler), progress=progress, callback=callback)

    def to_classifier(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] input of the bundled digit classifier (2x2 average pooling for 16x16 images)."""
        from .mmdit import to_classifier_space

        return to_classifier_space(images)

    def inductor(self, model: torch.nn.Module):
        """``model`` compiled by plain Inductor (``dynamic=False``), the baseline."""
        return torch.compile(model, backend="inductor", dynamic=False)

    def fastcache(self, model: torch.nn.Module, options: dict | None = None):
        """``model`` under ``backend="fastcache"`` with ``options``, in the form ``sample`` takes: the
        compiled module (DiT) or a ``StableDiffusion3Pipeline`` after ``enable_fastcache(pipe)`` (MMDiT)."""
        from ..api import enable_fastcache
        from ..backend import FastCacheBackend

        options = dict(options or {})
        if self.pipeline:
            from .mmdit_sampling import build_pipeline

            return enable_fastcache(build_pipeline(model), **options)
        return torch.compile(model, backend=FastCacheBackend(**options), dynamic=False)


def _sample_dit(transformer, labels, *, steps, guidance, seeds, scheduler, progress, callback):
    from .sampling import sample

    return sample(transformer, labels, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                  seed=seeds, progress=progress, callback=callback)


@lru_cache(maxsize=1)
def _embedder():
    from .mmdit import load_mmdit

    return load_mmdit()[1]


def _load_mmdit():
    from .mmdit import load_mmdit

    return load_mmdit()[0]


def _sample_mmdit(transformer, labels, *, steps, guidance, seeds, scheduler, progress, callback):
    from .mmdit_sampling import sample_mmdit

    return sample_mmdit(transformer, _embedder(), labels, num_inference_steps=steps, guidance_scale=guidance,
                        seed=seeds, progress=progress, callback=callback)


def _load_dit():
    from .model import load

    return load()


def _mmdit_guidance() -> float:
    """The CFG scale the bundled MMDiT was evaluated with (its JSON record), else the training default."""
    from .mmdit import load_mmdit_record
    from .train_mmdit import DEFAULT_GUIDANCE

    try:
        return float(load_mmdit_record().get("evaluation", {}).get("guidance_scale", DEFAULT_GUIDANCE))
    except FileNotFoundError:
        return DEFAULT_GUIDANCE


def job(name: str) -> ReferenceJob:
    """The ``ReferenceJob`` of bundled model ``name`` in ``MODELS``.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "dit":
        from .sampling import SCHEDULERS

        return ReferenceJob("dit", "reference DiT (DDIM, v-prediction, 8x8, 64 tokens)", 50, 2.0, SCHEDULERS, 8,
                            1000.0, False, _load_dit, _sample_dit)
    if name == "mmdit":
        return ReferenceJob("mmdit", "reference MMDiT (SD3 pipeline, rectified flow, 16x16, 64+4 tokens)", 28,
                            _mmdit_guidance(), ("flow_euler",), 16, 1000.0, True, _load_mmdit, _sample_mmdit)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
