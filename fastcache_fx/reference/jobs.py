"""One interface to the bundled reference models for the demo and the benchmarks.

``job("dit")``: the class-conditional DiT (``DiTTransformer2DModel``, v-prediction, DDIM, 8x8
pixels, 64 tokens), sampled by ``sampling.sample``.
``job("mmdit")``: the flow-matching MMDiT (``SD3Transformer2DModel``, 16x16 pixels, 64 image
tokens + 4 class tokens), sampled by the real ``StableDiffusion3Pipeline`` (``mmdit_sampling``);
its 16x16 samples are average-pooled 2x2 to 8x8 for the digit classifier (class accuracy,
digits-FID).
``job("dit_unseen")``: a second class-conditional DiT nothing in the library is tuned on (8 blocks of
width 96, epsilon prediction, linear schedule, DDIM, CFG 3; ``model.UNSEEN_DIT_CONFIG``), sampled
like the DiT.
``job("wan")``: the video DiT (``WanTransformer3DModel``, rectified flow, clips of 4 frames of
12x12 pixels, 144 tokens), sampled by the real ``WanPipeline`` (separate cond / uncond calls);
sample i of a batch moves in direction ``i % 4`` (``wan.MOTION_NAMES``); each frame's inkiest
8x8 window goes to the digit classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

MODELS = ("dit", "mmdit", "wan", "dit_unseen")


@dataclass(frozen=True)
class ReferenceJob:
    """How to load, compile, sample and score one bundled model.

    Attributes:
        name: one of ``MODELS``.
        title: a short human description (plots, tables).
        steps, guidance: default denoising steps and CFG scale.
        schedulers: accepted scheduler names, the first is the default.
        image_size: side of the generated images in pixels (8 or 16).
        timestep_max: the largest timestep the sampler passes to the transformer (1000 for both).
        pipeline: True when sampling runs a diffusers pipeline (fastcache is then enabled with
            ``fastcache_fx.enable_fastcache(pipe)``).
        frames: frames per sample (1 for the image models; ``sample`` then returns
            [B, 1, frames, S, S]).
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
    frames: int = 1

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
        """[B * frames, 1, 8, 8] input of the bundled digit classifier (2x2 average pooling for
        16x16 images; per frame the inkiest 8x8 window of a clip)."""
        if self.frames > 1:
            from .wan import frames_to_classifier

            return frames_to_classifier(images)
        from .mmdit import to_classifier_space

        return to_classifier_space(images)

    def classifier_labels(self, labels) -> torch.Tensor:
        """The class of each of ``to_classifier``'s images: ``labels`` [B], each repeated per frame."""
        return torch.as_tensor(labels).repeat_interleave(self.frames)

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as images [B * frames, 1, S, S] (frames of a clip in order), for SSIM and grids."""
        return x if self.frames == 1 else x.permute(0, 2, 1, 3, 4).reshape(-1, 1, *x.shape[-2:])

    def temporal_psnr(self, x: torch.Tensor) -> float | None:
        """Mean motion-compensated PSNR between consecutive frames, dB (``wan.motion_compensated_psnr``);
        None for an image model."""
        if self.frames == 1:
            return None
        from .wan import motion_compensated_psnr

        return float(motion_compensated_psnr(x, wan_motions(x.shape[0])).mean())

    def inductor(self, model: torch.nn.Module):
        """``model`` compiled by plain Inductor (``dynamic=False``), the baseline."""
        return torch.compile(model, backend="inductor", dynamic=False)

    def fastcache(self, model: torch.nn.Module, options: dict | None = None):
        """``model`` under ``backend="fastcache"`` with ``options``, in the form ``sample`` takes: the
        compiled module (DiT; ``enable_fastcache(model)`` with a ``target_psnr``, whose sampler the
        sampling loop sets) or a ``StableDiffusion3Pipeline`` after ``enable_fastcache(pipe)`` (MMDiT)."""
        from ..api import enable_fastcache
        from ..backend import FastCacheBackend

        options = dict(options or {})
        if self.pipeline:
            if self.frames > 1:
                from .wan_sampling import build_wan_pipeline as build_pipeline
            else:
                from .mmdit_sampling import build_pipeline

            return enable_fastcache(build_pipeline(model), **options)
        if "target_psnr" in options:  # the sampling loop tells the target its sampler (set_sampler)
            return enable_fastcache(model, dynamic=False, **options)
        return torch.compile(model, backend=FastCacheBackend(**options), dynamic=False)


def _sample_dit(transformer, labels, *, steps, guidance, seeds, scheduler, progress, callback, name="dit"):
    from .model import scheduler_config
    from .sampling import sample

    return sample(transformer, labels, num_inference_steps=steps, guidance_scale=guidance, scheduler=scheduler,
                  seed=seeds, progress=progress, callback=callback, scheduler_config=scheduler_config(name=name))


def _sample_unseen(transformer, labels, **kw):
    from .model import UNSEEN_NAME

    return _sample_dit(transformer, labels, name=UNSEEN_NAME, **kw)


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


def wan_motions(b: int) -> torch.Tensor:
    """The motion of each of ``b`` Wan samples: sample i moves in direction ``i % 4``."""
    from .wan import MOTION_NAMES

    return torch.arange(b) % len(MOTION_NAMES)


@lru_cache(maxsize=1)
def _wan_embedder():
    from .wan import load_wan

    return load_wan()[1]


def _load_wan():
    from .wan import load_wan

    return load_wan()[0]


def _sample_wan(transformer, labels, *, steps, guidance, seeds, scheduler, progress, callback):
    from .wan_sampling import sample_wan

    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    return sample_wan(transformer, _wan_embedder(), labels, wan_motions(len(labels)), num_inference_steps=steps,
                      guidance_scale=guidance, seed=seeds, progress=progress, callback=callback)


def _load_dit():
    from .model import load

    return load()


def _load_unseen():
    from .model import UNSEEN_NAME, load

    return load(name=UNSEEN_NAME)


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
    if name == "dit_unseen":
        from .sampling import SCHEDULERS

        return ReferenceJob("dit_unseen", "unseen DiT (DDIM, epsilon, linear schedule, 8x8, 8 blocks)", 50, 3.0,
                            SCHEDULERS, 8, 1000.0, False, _load_unseen, _sample_unseen)
    if name == "wan":
        from .train_wan import DEFAULT_GUIDANCE, EVAL_STEPS

        return ReferenceJob("wan", "reference Wan video DiT (WanPipeline, UniPC, 4 frames of 12x12, 144 tokens)",
                            EVAL_STEPS, DEFAULT_GUIDANCE, ("unipc",), 12, 1000.0, True, _load_wan, _sample_wan,
                            frames=4)
    raise ValueError(f"model: expected one of {MODELS}, got {name!r}")
