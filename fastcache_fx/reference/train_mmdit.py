"""Train the reference MMDiT (``SD3Transformer2DModel`` + ``ClassEmbedder``) with rectified flow.

    python -m fastcache_fx.reference.train mmdit               # 2400 steps: 104 min on the shared 2 cores
    python -m fastcache_fx.reference.train mmdit --resume      # continue a stopped run
    python -m fastcache_fx.reference.train_mmdit --finalize    # re-evaluate the shipped weights

Data: scikit-learn's 8x8 digits (train split), in [-1, 1], upsampled bilinearly to 16x16.

Objective (rectified flow / flow matching in the SD3 convention; Liu et al. 2022, arXiv
2209.03003; Esser et al. 2024, arXiv 2403.03206, eq. 1-3 and section 3.1): sigma ~
logit-normal(0, 1) (sigma = sigmoid(n), n ~ N(0, 1): SD3's "rf/lognorm(0.00, 1.00)"),
x_sigma = (1 - sigma) x0 + sigma noise, the transformer gets ``timestep = 1000 sigma`` and
predicts v = noise - x0, loss = MSE(v_pred, v) with uniform weighting. Label dropout 0.1 to the
learned null class trains the unconditional branch for classifier-free guidance.

AdamW with warmup and cosine decay, gradient clipping 1.0, an EMA of the weights (the EMA is
what ships), fixed seeds, tqdm progress bars (the loop: ``trainer.fit``, shared with the Wan
model). Every ``eval_every`` steps the EMA is saved to
the package (a stopped run leaves a usable model) and 100 samples (10 per class, 28 Euler steps
of the SD3 pipeline with CFG) are scored by the bundled 8x8 classifier after 2x2 average pooling
(16x16 -> 8x8); the full training state goes to ``<run_dir>/checkpoint.pt`` for ``--resume``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .metrics import class_accuracy, digits_fid, save_grid
from .mmdit import (
    EMBEDDER_CONFIG, FLOW_SCHEDULER_CONFIG, MMDIT_CONFIG, MMDIT_NAME, MMDIT_NULL_CLASS, ClassEmbedder,
    bundle, build_mmdit, load_mmdit, load_mmdit_record, to_classifier_space, upsample_digits,
)
from .mmdit_sampling import sample_mmdit
from .model import WEIGHTS_DIR, load_classifier, save_model
from . import trainer
from .trainer import fit

LABEL_DROPOUT = 0.1
EVAL_STEPS = 28
EVAL_PER_CLASS = 10
EVAL_SEED = 1000
#: the small sample the tests reproduce: 1 per class, 28 steps, seeds 5000..5009
TEST_SAMPLE = dict(per_class=1, seed=5000, steps=EVAL_STEPS)
DEFAULT_GUIDANCE = 3.0


def flow_matching_loss(transformer, embedder, x0: torch.Tensor, labels: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss (SD3 convention): mean over elements of (v_pred - (noise - x0))^2.

    x0 [B, 1, 16, 16] in [-1, 1]; labels [B] in 0..10 (10 = null); sigma ~ logit-normal(0, 1)
    per sample; x_sigma = (1 - sigma) x0 + sigma noise; timestep = 1000 sigma. Returns a scalar.
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(b, generator=gen))
    s = sigma.view(b, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    ehs, pooled = embedder(labels)
    pred = transformer(xt, encoder_hidden_states=ehs, pooled_projections=pooled,
                       timestep=sigma * 1000).sample
    return F.mse_loss(pred, noise - x0)


def evaluate(transformer, embedder, guidance: float = DEFAULT_GUIDANCE, per_class: int = EVAL_PER_CLASS,
             seed: int = EVAL_SEED, steps: int = EVAL_STEPS, fid: bool = False) -> tuple[dict, torch.Tensor]:
    """Sample ``per_class`` digits of each class (class-major, seeds ``seed``..) and score them with
    the bundled classifier on 2x2-average-pooled 8x8 images. Returns (metrics, images [N,1,16,16])."""
    labels = torch.arange(10).repeat_interleave(per_class)
    imgs = sample_mmdit(transformer, embedder, labels, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    clf = load_classifier()
    small = to_classifier_space(imgs)
    out = {"class_accuracy": class_accuracy(clf, small, labels), "samples": len(labels), "steps": steps,
           "guidance_scale": guidance, "seed": seed}
    if fid:
        out["digits_fid"] = digits_fid(clf, small)
    return out, imgs


def _record(training: dict, evaluation: dict | None = None) -> dict:
    return {
        "model_class": "SD3Transformer2DModel", "model_config": MMDIT_CONFIG,
        "embedder_class": "fastcache_fx.reference.mmdit.ClassEmbedder", "embedder_config": EMBEDDER_CONFIG,
        "scheduler_class": "FlowMatchEulerDiscreteScheduler", "scheduler_config": FLOW_SCHEDULER_CONFIG,
        "null_class": MMDIT_NULL_CLASS, "image_size": 16,
        "pipeline": "diffusers.StableDiffusion3Pipeline, text encoders/tokenizers/vae None, prompt_embeds from "
                    "the embedder, output_type='latent' (pixel space)",
        "classifier_input": "16x16 samples average-pooled 2x2 to 8x8 for the bundled 8x8 classifier",
        "training": training, "evaluation": evaluation or {},
    }


def train_mmdit(steps: int = 2400, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                ema_decay: float = 0.999, eval_every: int = 400, guidance: float = DEFAULT_GUIDANCE,
                out_dir: Path = WEIGHTS_DIR, run_dir: Path = Path("runs/mmdit"), resume: bool = False) -> None:
    """Train the MMDiT and its class embedder (``trainer.fit``); the EMA is saved to ``out_dir`` at
    every evaluation.

    Raises:
        ValueError: a non-positive ``steps``, ``batch_size``, ``lr`` or ``eval_every``.
        FileNotFoundError: ``resume`` without ``<run_dir>/checkpoint.pt``.
    """
    (xtr, ytr), (xte, yte) = data.train_test_split()
    xtr, xte = upsample_digits(xtr), upsample_digits(xte)

    def loss_fn(model, step, gen):
        idx = torch.randint(0, len(ytr), (batch_size,), generator=gen)
        labels = torch.where(torch.rand(batch_size, generator=gen) < LABEL_DROPOUT, MMDIT_NULL_CLASS, ytr[idx])
        return flow_matching_loss(model["transformer"], model["embedder"], xtr[idx], labels, gen)

    def held_out(ema):
        return flow_matching_loss(ema["transformer"], ema["embedder"], xte, yte, torch.Generator().manual_seed(123))

    def preview(ema, step):
        ev, imgs = evaluate(ema["transformer"], ema["embedder"], guidance=guidance)
        save_grid(imgs, run_dir / f"step{step:05d}.png", nrow=10, col_major=True, scale=3)
        return {"preview_class_accuracy": ev["class_accuracy"], "preview_guidance": guidance}

    torch.manual_seed(seed)
    model = bundle(build_mmdit(), ClassEmbedder(**EMBEDDER_CONFIG))
    info = {"label_dropout": LABEL_DROPOUT,
            "sigma_sampling": "logit-normal(0, 1): sigma = sigmoid(n), n ~ N(0, 1)",
            "objective": "rectified flow: x = (1-sigma) x0 + sigma noise, timestep = 1000 sigma, "
                         "MSE(v_pred, noise - x0)",
            "data": "sklearn load_digits 8x8 train split, [-1,1], bilinear upsampling to 16x16"}
    fit(MMDIT_NAME, model, loss_fn, held_out, preview, _record, steps=steps, lr=lr, seed=seed, ema_decay=ema_decay,
        eval_every=eval_every, out_dir=out_dir, run_dir=run_dir, resume=resume,
        batch_size=batch_size, info=info)


def finalize(guidance: float = DEFAULT_GUIDANCE, out_dir: Path = WEIGHTS_DIR,
             grid_png: Path | None = Path("docs/mmdit_samples.png"), sweep=(1.5, 2.0, 3.0, 4.0, 5.0),
             notes: list[str] | None = None) -> dict:
    """Evaluate the shipped weights and write the ``evaluation`` section of the JSON record: class
    accuracy and digits-FID of 100 samples (28 steps, CFG ``guidance``), both at the guidance
    scales of ``sweep``, and the small sample the tests reproduce. Writes the sample grid
    (one column per class) and appends ``notes`` to ``training.notes``.

    Raises:
        FileNotFoundError: no shipped weights in ``out_dir``.
    """
    transformer, embedder = load_mmdit(out_dir)
    record = load_mmdit_record(out_dir)
    if notes:
        record["training"].setdefault("notes", []).extend(notes)
    main, imgs = evaluate(transformer, embedder, guidance=guidance, fid=True)
    by_guidance = {}
    for g in sweep:
        ev = evaluate(transformer, embedder, guidance=g, fid=True)[0]
        by_guidance[str(g)] = {"class_accuracy": ev["class_accuracy"], "digits_fid": ev["digits_fid"]}
    tp = TEST_SAMPLE
    small, _ = evaluate(transformer, embedder, guidance=guidance, per_class=tp["per_class"], seed=tp["seed"],
                        steps=tp["steps"])
    evaluation = {**main, "by_guidance": by_guidance, "test_sample": small,
                  "classifier_input": "2x2 average pooling of the 16x16 samples to 8x8",
                  "sampler": "StableDiffusion3Pipeline + FlowMatchEulerDiscreteScheduler, batched CFG; labels "
                             "0..9 each repeated per_class times, sample i seeded seed + i"}
    record["evaluation"] = evaluation
    save_model(bundle(transformer, embedder), MMDIT_NAME, record, out_dir)
    if grid_png is not None:
        Path(grid_png).parent.mkdir(parents=True, exist_ok=True)
        save_grid(imgs, grid_png, nrow=10, col_major=True, scale=6)
    print({k: v for k, v in evaluation.items() if k != "sampler"})
    return evaluation


def main(argv=None) -> None:
    trainer.main(MMDIT_NAME, __doc__, argv, train_mmdit, finalize, steps=2400, batch_size=128, eval_every=400,
                 guidance=DEFAULT_GUIDANCE, threads=2)


if __name__ == "__main__":
    main()
