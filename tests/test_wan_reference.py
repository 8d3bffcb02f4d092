"""The third bundled reference model: the Wan video DiT, its data, WanPipeline sampler, metrics and demo."""

import json

import pytest
import torch

from fastcache_fx.reference import wan as W
from fastcache_fx.reference.wan_sampling import build_wan_pipeline, sample_wan


@pytest.fixture(scope="module")
def bundled():
    return W.load_wan()


def test_bundled_files_load_offline_and_reproduce_frame_accuracy(bundled):
    from fastcache_fx.reference.train_wan import TEST_SAMPLE, evaluate

    transformer, embedder = bundled
    rec = W.load_wan_record()
    assert type(transformer).__name__ == "WanTransformer3DModel" and len(transformer.blocks) == 6
    assert rec["embedder_config"] == W.EMBEDDER_CONFIG and rec["scheduler_config"] == W.WAN_SCHEDULER_CONFIG
    ev = rec["evaluation"]
    assert ev["samples"] == 40 and ev["frame_class_accuracy"] >= 0.9
    assert rec["training"]["elapsed_s"] > 0 and rec["training"]["history"]
    small = ev["test_sample"]  # recomputed: 10 clips, 40 frames (one frame = 0.025)
    got, clips = evaluate(transformer, embedder, guidance=small["guidance_scale"], seed=small["seed"],
                          steps=small["steps"], count=TEST_SAMPLE["count"])
    assert clips.shape == (10, 1, 4, 12, 12)
    assert abs(got["frame_class_accuracy"] - small["frame_class_accuracy"]) <= 0.05
    assert abs(got["temporal_psnr_db"] - small["temporal_psnr_db"]) <= 0.5


def test_wan_sampler_is_deterministic_per_seed_across_batches(bundled):
    transformer, embedder = bundled
    a = sample_wan(transformer, embedder, [3, 7, 1], [0, 1, 2], num_inference_steps=3, seed=[11, 12, 13])
    b = sample_wan(transformer, embedder, [7], [1], num_inference_steps=3, seed=[12])  # same seed, other batch
    assert torch.allclose(a[1:2], b, atol=1e-5)
    pipe = build_wan_pipeline(transformer)  # a given pipeline gives the same clips as a bare transformer
    c = sample_wan(pipe, embedder, [1, 3], [2, 0], num_inference_steps=3, seed=[13, 11])
    assert torch.allclose(c, a[[2, 0]], atol=1e-5)
    assert not torch.allclose(a, sample_wan(transformer, embedder, [3, 7, 1], [0, 1, 2], num_inference_steps=3,
                                            seed=[14, 15, 16]))


def test_bad_input_raises_value_error_naming_the_argument(bundled):
    transformer, embedder = bundled
    for kwargs, name in ((dict(digits=[10], motions=[0]), "digits"), (dict(digits=[1], motions=[4]), "motions"),
                         (dict(digits=[1, 2], motions=[0]), "motions")):
        with pytest.raises(ValueError, match=name):
            sample_wan(transformer, embedder, num_inference_steps=2, **kwargs)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample_wan(transformer, embedder, [1], [0], num_inference_steps=2, guidance_scale=0.5)
    with pytest.raises(ValueError, match="starts"):
        W.moving_clips(torch.zeros(1, 1, 8, 8), torch.tensor([0]), torch.tensor([[0, 2]]))  # right from x=2


def test_moving_clips_and_the_temporal_metric():
    """Training clips keep the digit whole on the canvas and move it one pixel per frame; the
    motion-compensated PSNR is perfect on them and drops when strokes flicker."""
    from fastcache_fx import reference as R
    from fastcache_fx.reference.data import train_test_split

    (x, y), _ = train_test_split()
    clips, digits, motions = W.random_clips(x, y, 32, torch.Generator().manual_seed(0))
    assert clips.shape == (32, 1, 4, 12, 12) and set(motions.tolist()) == {0, 1, 2, 3}
    ink = (clips + 1).sum((-1, -2))  # the whole digit in every frame
    assert torch.allclose(ink, ink[:, :, :1].expand_as(ink))
    assert R.class_accuracy(R.load_classifier(), W.frames_to_classifier(clips), digits.repeat_interleave(4)) >= 0.95
    clean = W.motion_compensated_psnr(clips, motions)
    assert (clean > 60).all()
    flicker = clips.clone()
    flicker[:, :, 1::2] = (flicker[:, :, 1::2] + 0.5 * torch.randn_like(flicker[:, :, 1::2])).clamp(-1, 1)
    assert (W.motion_compensated_psnr(flicker, motions) < 20).all()
    wrong = W.motion_compensated_psnr(clips, (motions + 1) % 4)  # the motion must be undone, not ignored
    assert (wrong < clean).all()


def test_demo_wan_writes_png_and_json(tmp_path):
    from fastcache_fx.cli import main

    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    rc = main(["demo", "--model", "wan", "--steps", "4", "--seeds", "1", "--repeats", "1", "--classes", "0,1,2",
               "--no-progress", "--out-png", str(png), "--out-json", str(js)])
    assert rc == 0 and png.stat().st_size > 1000 and (tmp_path / "demo_trace.png").stat().st_size > 1000
    rec = json.loads(js.read_text())
    for method in ("inductor", "fastcache"):
        assert set(rec["results"][method]) == {"seconds_per_image", "speedup", "block_approx_ratio", "psnr_db",
                                               "ssim", "class_accuracy", "digits_fid", "temporal_psnr_db"}
    assert rec["model"] == "wan" and rec["images"] == 3 and rec["steps"] == 4 and rec["scheduler"] == "unipc"
    assert len(rec["per_block_approx_ratio"]) == 6
    assert rec["results"]["inductor"]["class_accuracy"] > 0.5  # 12 frames of a trained model at 4 steps
