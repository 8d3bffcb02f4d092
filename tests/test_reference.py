"""The bundled reference model, its sampler, metrics and the demo command."""

import json

import numpy as np
import pytest
import torch

from fastcache_fx import reference as R
from fastcache_fx.reference.data import train_test_split


def test_bundled_files_load_offline_and_classifier_is_accurate():
    rec = R.load_record("classifier")
    assert rec["held_out_accuracy"] >= 0.95
    clf = R.load_classifier()
    (_, _), (xte, yte) = train_test_split()
    assert R.class_accuracy(clf, xte, yte) >= 0.95  # recomputed, not just read
    model = R.load()
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert model.config.num_layers == R.DIT_CONFIG["num_layers"]
    assert R.load_record("dit")["model_config"] == R.DIT_CONFIG


def test_sampling_is_deterministic_per_seed():
    model = R.load()
    a = R.sample(model, [3, 7], num_inference_steps=3, seed=[11, 12])
    b = R.sample(model, [7], num_inference_steps=3, seed=[12])  # same seed, other batch
    assert a.shape == (2, 1, 8, 8)
    assert torch.allclose(a[1:], b, atol=1e-5)
    c = R.sample(model, [3, 7], num_inference_steps=3, seed=[13, 14])
    assert not torch.allclose(a, c)


def test_sample_rejects_bad_input():
    with pytest.raises(ValueError, match="class_labels"):
        R.sample(R.load(), [10], num_inference_steps=2)
    with pytest.raises(ValueError, match="scheduler"):
        R.sample(R.load(), [1], num_inference_steps=2, scheduler="heun2")


def test_psnr_ssim_known_pair():
    a = torch.zeros(1, 1, 8, 8)
    b = a + 0.1  # MSE = 0.01, data range 2 -> PSNR = 10 log10(4 / 0.01)
    assert float(R.psnr(a, b)) == pytest.approx(10 * np.log10(400.0))
    assert float(R.ssim(a, a)) == pytest.approx(1.0)
    # constant images: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) = C1 / (0.01 + C1), C1 = (0.01 * 2)^2
    assert float(R.ssim(a, b)) == pytest.approx(0.0004 / 0.0104, rel=1e-6)
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    assert float(R.ssim(x, x + 0.05 * torch.randn_like(x))) < 1.0


def test_digits_fid_separates_real_from_noise():
    clf = R.load_classifier()
    (xtr, _), (xte, _) = train_test_split()
    half = len(xtr) // 2
    real_real = R.digits_fid(clf, xtr[:half], xtr[half:])
    real_noise = R.digits_fid(clf, torch.rand_like(xtr[:half]) * 2 - 1, xtr[half:])
    assert real_real * 20 < real_noise


@pytest.mark.parametrize("model,scheduler,blocks", [("dit", "ddim", 6), ("mmdit", "flow_euler", 6)])
def test_demo_writes_png_and_json(tmp_path, model, scheduler, blocks):
    from fastcache_fx.cli import main

    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    rc = main(["demo", "--model", model, "--steps", "4", "--seeds", "1", "--repeats", "1", "--classes", "0,1,2",
               "--no-progress",
               "--out-png", str(png), "--out-json", str(js)])
    assert rc == 0 and png.stat().st_size > 1000 and (tmp_path / "demo_trace.png").stat().st_size > 1000
    rec = json.loads(js.read_text())
    for method in ("inductor", "fastcache"):
        assert set(rec["results"][method]) == {"seconds_per_image", "speedup", "block_approx_ratio", "psnr_db",
                                               "ssim", "class_accuracy", "digits_fid"}
    assert rec["model"] == model and rec["images"] == 3 and rec["steps"] == 4 and rec["scheduler"] == scheduler
    assert len(rec["per_block_approx_ratio"]) == blocks


def test_demo_bad_flag_is_a_clear_error(capsys):
    from fastcache_fx.cli import main

    assert main(["demo", "--threshold", "-1"]) == 2
    assert "cache_ratio_threshold" in capsys.readouterr().err


def test_frechet_distance_equals_sqrtm_and_never_warns():
    """digits-FID on a few samples (N <= d: singular covariances): no scipy LinAlgWarning, and on
    full-rank data the same value as the textbook sqrtm(C1 C2) formula."""
    import warnings

    import numpy as np
    from scipy import linalg

    from fastcache_fx.reference.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(size=(400, 8)) * 1.3 + 0.2
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(linalg.sqrtm(c1 @ c2)))
    assert abs(frechet_distance(a, b) - ref) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(frechet_distance(rng.normal(size=(40, 128)), rng.normal(size=(360, 128))))
