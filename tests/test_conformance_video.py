"""Every diffusers video DiT class (``fastcache_fx.zoo_classes``) with ``backend="fastcache"``:
approximation off equals eager, blocks found and approximated on a scripted trajectory, no
fallback (docs/supported-models.md is this table)."""

import pytest

from conformance import assert_conforms, names


@pytest.mark.parametrize("name", names("video"))
def test_conforms(name):
    assert_conforms(name)


def _unet_layers():
    from diffusers.models import Transformer2DModel, TransformerTemporalModel

    # the temporal and the spatial transformer layers of a video / image UNet, as the UNets call them
    temporal = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                        num_layers=2, norm_num_groups=4)
    spatial = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=2,
                                 norm_num_groups=4, cross_attention_dim=8)
    return {"TransformerTemporalModel": (temporal, lambda x: dict(hidden_states=x, num_frames=3)),
            "Transformer2DModel": (spatial, lambda x: dict(hidden_states=x, encoder_hidden_states=x.new_ones(6, 4, 8)))}


@pytest.mark.parametrize("cls", ["TransformerTemporalModel", "Transformer2DModel"])
def test_unet_layer_is_refused_with_reason(cls):
    """A transformer with blocks that is not a denoiser (a UNet's layer: no timestep) gets plain
    Inductor, one warning, and the reason in stats(); never a silent step cache."""
    import warnings

    import torch

    import fastcache_fx

    torch._dynamo.reset()
    model, kwargs = _unet_layers()[cls]
    model.eval().requires_grad_(False)
    compiled = torch.compile(model, backend="fastcache", options={"cache_ratio_threshold": 10.0})
    xs = [torch.randn(6, 16, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compiled(**kwargs(x)).sample for x in xs]
    st = fastcache_fx.stats(compiled)
    assert len(st["fallback"]) == 1 and f"not a DiT denoiser: {cls}.forward" in st["fallback"][0], st["fallback"]
    assert sum("not a DiT denoiser" in str(w.message) for w in caught) == 1
    assert st["block_approx_ratio"] == 0
    for x, out in zip(xs, outs):
        assert torch.allclose(out, model(**kwargs(x)).sample, rtol=1e-4, atol=1e-5)
