"""The second bundled reference model: the flow-matching MMDiT, its SD3 pipeline sampler and demo."""

import pytest
import torch

from fastcache_fx.reference import mmdit as M
from fastcache_fx.reference.jobs import job
from fastcache_fx.reference.mmdit_sampling import build_pipeline, make_flow_scheduler, sample_mmdit


@pytest.fixture(scope="module")
def bundled():
    return M.load_mmdit()


def test_bundled_files_load_offline_and_reproduce_class_accuracy(bundled):
    from fastcache_fx import reference as R

    transformer, embedder = bundled
    rec = M.load_mmdit_record()
    assert type(transformer).__name__ == "SD3Transformer2DModel"
    assert rec["model_config"] == M.MMDIT_CONFIG and rec["embedder_config"] == M.EMBEDDER_CONFIG
    assert transformer.transformer_blocks[-1].context_pre_only  # SD3's last joint block
    assert not transformer.transformer_blocks[0].context_pre_only
    ev = rec["evaluation"]
    assert ev["samples"] == 100 and ev["steps"] == 28 and ev["class_accuracy"] >= 0.9
    assert rec["training"]["elapsed_s"] > 0 and rec["training"]["history"]
    small = ev["test_sample"]  # recomputed, not just read: 1 per class, 28 steps (one sample = 0.1)
    labels = torch.arange(10).repeat_interleave(small["samples"] // 10)
    imgs = sample_mmdit(transformer, embedder, labels, num_inference_steps=small["steps"],
                        guidance_scale=small["guidance_scale"], seed=small["seed"])
    assert imgs.shape == (len(labels), 1, 16, 16)
    acc = R.class_accuracy(R.load_classifier(), M.to_classifier_space(imgs), labels)
    assert abs(acc - small["class_accuracy"]) <= 0.1


def test_flow_sampler_is_deterministic_per_seed_across_batches(bundled):
    transformer, embedder = bundled
    a = sample_mmdit(transformer, embedder, [3, 7, 1], num_inference_steps=3, seed=[11, 12, 13])
    b = sample_mmdit(transformer, embedder, [7], num_inference_steps=3, seed=[12])  # same seed, other batch
    assert torch.allclose(a[1:2], b, atol=1e-5)
    pipe = build_pipeline(transformer)  # a given pipeline gives the same images as a bare transformer
    c = sample_mmdit(pipe, embedder, [1, 3], num_inference_steps=3, seed=[13, 11])
    assert torch.allclose(c, a[[2, 0]], atol=1e-5)
    d = sample_mmdit(transformer, embedder, [3, 7, 1], num_inference_steps=3, seed=[14, 15, 16])
    assert not torch.allclose(a, d)


def test_scheduler_follows_the_sd3_flow_convention():
    """timestep = 1000 sigma (0..1000, FastCacheConfig's default timestep_max), and an Euler step is
    x + (sigma_next - sigma) v with v = noise - x0, so it maps x_sigma = (1-sigma) x0 + sigma noise
    along the straight path the model was trained on."""
    sched = make_flow_scheduler(M.FLOW_SCHEDULER_CONFIG)
    sched.set_timesteps(4)
    assert torch.allclose(sched.timesteps, sched.sigmas[:-1] * 1000)
    assert float(sched.timesteps.max()) <= 1000 and float(sched.sigmas[-1]) == 0.0
    x0, noise = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    s0, s1 = sched.sigmas[0], sched.sigmas[1]
    x = (1 - s0) * x0 + s0 * noise
    out = sched.step(noise - x0, sched.timesteps[0], x).prev_sample
    assert torch.allclose(out, (1 - s1) * x0 + s1 * noise, atol=1e-5)


def test_bad_input_raises_value_error_naming_the_argument(bundled):
    transformer, embedder = bundled
    with pytest.raises(ValueError, match="class_labels"):
        sample_mmdit(transformer, embedder, [10], num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_mmdit(transformer, embedder, [1], num_inference_steps=2, guidance_scale=0.5)
    with pytest.raises(ValueError, match="seed"):
        sample_mmdit(transformer, embedder, [1, 2], num_inference_steps=2, seed=[1])
    with pytest.raises(ValueError, match="num_tokens"):
        M.ClassEmbedder(num_tokens=0)
    with pytest.raises(ValueError, match="labels"):
        embedder(torch.tensor([11]))
    with pytest.raises(ValueError, match="x"):
        M.to_classifier_space(torch.zeros(1, 1, 12, 12))
    with pytest.raises(ValueError, match="model"):
        job("pixart")
    with pytest.raises(ValueError, match="scheduler"):
        job("mmdit").check_scheduler("ddim")


def test_upsampled_held_out_digits_survive_the_classifier_path():
    """The 16x16 training data, pooled back to 8x8, is still classified like the 8x8 digits."""
    from fastcache_fx import reference as R
    from fastcache_fx.reference.data import train_test_split

    (_, _), (xte, yte) = train_test_split()
    back = M.to_classifier_space(M.upsample_digits(xte))
    assert back.shape == xte.shape
    assert R.class_accuracy(R.load_classifier(), back, yte) >= 0.95
