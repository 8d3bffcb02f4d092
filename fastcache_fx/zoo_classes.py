"""Every diffusers DiT class from a tiny config, for the conformance test and its table (docs/supported-models.md).

Each ``ClassSpec`` holds the tiny config and the forward inputs of one transformer class, taken
from diffusers' own test suite (tests/models/transformers/ in the diffusers repository, 0.42.1)
and shrunk where a class allowed it (fewer layers, smaller images), plus the name of the timestep
input and its range. Nothing is downloaded: weights are random (seeded), text inputs are given
as embeddings.

``build(name)`` returns the model in eval mode with gradients off (zero-initialised weight
matrices drawn at random, as a trained model's are not zero) and a function of
(batch, generator) that makes its forward kwargs; ``trajectory`` scripts the inputs of a
denoising trajectory (decreasing timestep, slowly moving latents) for the cache to act on.
"""

from __future__ import annotations

import torch

from . import torch_compat
from . import zoo_specs_image, zoo_specs_recent, zoo_specs_video  # noqa: F401 (they fill SPECS)
from .zoo_spec import SPECS, ClassSpec, randn, scripted_timestep  # noqa: F401 (SPECS, ClassSpec re-exported)


def build(name: str, seed: int = 0):
    """(model, inputs): ``name``'s diffusers class built from its tiny config with weights seeded
    ``seed``, in eval mode with gradients off, and ``inputs(batch, generator)`` its forward kwargs.

    Raises:
        ValueError: ``name`` not in ``SPECS``.
    """
    import diffusers

    if name not in SPECS:
        raise ValueError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    spec = SPECS[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, spec.cls)(**spec.init).eval().requires_grad_(False)
    with torch.no_grad():  # zero-initialised weights (PRX's modulation, ERNIE-Image's output) would
        for p in model.parameters():  # make blocks the identity and the check vacuous
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model, spec.inputs


def trajectory(name: str, steps: int, batch: int = 1, seed: int = 0, drift: float = 0.05,
               relative: bool = False) -> list[dict]:
    """The forward kwargs of ``steps`` denoising steps of ``name``'s model at ``batch``: the
    timestep falls linearly from ``t_max`` to ``t_max / steps`` (rises for a ``rising`` class) and
    the latent moves by ``drift`` times a fixed standard-normal direction per step (``relative``:
    the direction scaled to the latent's norm). The default 5 % of a unit noise: tiny random
    models' block inputs change far more per step than a trained model's, so the approximation is
    forced with a large threshold, not earned.

    Raises:
        ValueError: ``name`` not in ``SPECS``; ``steps`` < 1.
    """
    if name not in SPECS:
        raise ValueError(f"name: expected one of {sorted(SPECS)}, got {name!r}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    spec = SPECS[name]
    g = torch.Generator().manual_seed(seed)
    base = spec.inputs(batch, g)
    x = base[spec.latent]
    direction = randn(g, *x.shape)
    if relative:
        direction = direction * (x.norm() / direction.norm())
    out = []
    for k in range(steps):
        kw = dict(base)
        kw[spec.timestep] = torch.full_like(base[spec.timestep], scripted_timestep(spec, k, steps))
        kw[spec.latent] = x + drift * k * direction
        out.append(kw)
    return out


def output_tensor(out) -> torch.Tensor:
    """The sample tensor of a diffusers transformer's output (a ``Transformer2DModelOutput``, a
    tuple whose first item is the sample, or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    return out.sample


def check(name: str, steps: int = 5, batch: int = 1, seed: int = 0) -> dict:
    """The conformance check of one class (docs/supported-models.md): ``name``'s model on a
    scripted ``trajectory`` of ``steps`` calls, eager and with ``backend="fastcache"``
    (``torch.compile``'s default arguments, ``cache_ratio_threshold=10``; ``enable_fastcache``
    for a spec with ``enable``), once with every block
    forced full (``replay_decisions``: approximation off, one compiled graph for both runs) and
    once live.

    Returns:
        dict with ``cls``, ``kind``; ``block_lists`` (the ModuleList names the blocks come from),
        ``blocks`` (count), ``streams`` (residual streams per block: sorted distinct counts),
        ``graphs`` {kind: count} (Dynamo's graphs: "fastcache", "glue" (no blocks, split off at a
        graph break), "fallback"...), ``fallback`` (reasons), ``off_rel_err`` (max over steps of
        ||compiled - eager|| / ||eager|| with every block computed), ``approx_ratio`` (approximated
        block-steps of the live run), ``live_rel_err`` (max over steps, live run vs eager),
        ``finite`` (every live output finite).

    Raises:
        ValueError: ``name`` not in ``SPECS``.
    """
    import fastcache_fx

    spec = SPECS[name]
    model, _ = build(name, seed)
    traj = trajectory(name, steps, batch, seed)
    with torch_compat.dynamo_config_patch(**spec.dynamo), torch_compat.inductor_config_patch(spec.inductor):
        refs = [output_tensor(model(**kw)) for kw in traj]
        if spec.enable:
            compiled = fastcache_fx.enable_fastcache(model, cache_ratio_threshold=10.0)
        else:
            compiled = torch.compile(model, backend="fastcache", options={"cache_ratio_threshold": 10.0})
        fastcache_fx.reset(compiled)
        with fastcache_fx.replay_decisions(compiled, [[False]], then="full"):
            off = [output_tensor(compiled(**kw)) for kw in traj]
        fastcache_fx.reset(compiled)
        on = [output_tensor(compiled(**kw)) for kw in traj]
    st = fastcache_fx.stats(compiled)
    graphs: dict[str, int] = {}
    for g in st["per_graph"]:
        graphs[g["kind"]] = graphs.get(g["kind"], 0) + 1
    lists = []
    for b in st["blocks"]:
        head = b.rsplit(".", 1)[0] if b.rsplit(".", 1)[-1].isdigit() else b
        if head not in lists:
            lists.append(head)
    return {"cls": spec.cls, "kind": spec.kind, "block_lists": lists, "blocks": len(st["blocks"]),
            "streams": sorted({n for g in st["per_graph"] for n in g.get("streams", [])}),
            "graphs": graphs, "fallback": st["fallback"],
            "off_rel_err": max(_rel(a, b) for a, b in zip(off, refs)),
            "approx_ratio": st["block_approx_ratio"],
            "live_rel_err": max(_rel(a, b) for a, b in zip(on, refs)),
            "finite": all(bool(torch.isfinite(o).all()) for o in on)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

