"""Train the bundled reference models on scikit-learn's digits (CPU, fixed seeds).

    python -m fastcache_fx.reference.train classifier      # ~1 min
    python -m fastcache_fx.reference.train dit --steps 4000 # ~1 h on 2 cores
    python -m fastcache_fx.reference.train dit_unseen       # the unseen variant (epsilon, linear schedule)
    python -m fastcache_fx.reference.train dit_cosine --steps 2000  # issue 37's held-out model (epsilon, cosine, 16x16)
    python -m fastcache_fx.reference.train mmdit            # the flow-matching MMDiT: see train_mmdit
    python -m fastcache_fx.reference.train wan              # the video DiT (WanTransformer3DModel): see train_wan

The DiT is trained with v-prediction on a cosine schedule (diffusers ``DDPMScheduler``; the
unseen variant ``dit_unseen`` with epsilon prediction on the linear schedule), label
dropout 0.1 for classifier-free guidance, AdamW with warmup and cosine decay, gradient
clipping and an EMA of the weights (the EMA is what ships). Checkpoints and preview grids are
written as it goes, so a stopped run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .optim import lr_at, optimizer_step
from .model import (
    CLASSIFIER_NAME, DIT_NAME, DIT_VARIANTS, NULL_CLASS, WEIGHTS_DIR, DigitClassifier, build_dit, save_model,
)


def _classifier_accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1 pixel (padding with background -1) for classifier robustness."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def train_classifier(epochs: int = 60, seed: int = 0, out_dir: Path = WEIGHTS_DIR) -> float:
    """Train the digit classifier; returns held-out accuracy and saves it in the JSON record."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xte, yte) = data.train_test_split()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in tqdm(range(epochs), desc="classifier"):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            xb = _shift_augment(xtr[idx], gen) + 0.05 * torch.randn(len(idx), 1, 8, 8, generator=gen)
            loss = F.cross_entropy(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = _classifier_accuracy(model, xte, yte)
    save_model(model, CLASSIFIER_NAME, {
        "held_out_accuracy": acc, "train_samples": len(ytr), "held_out_samples": len(yte),
        "epochs": epochs, "seed": seed, "split_seed": data.SPLIT_SEED,
    }, out_dir)
    print(f"classifier held-out accuracy: {acc:.4f}")
    return acc


def _loss(model, sched, x0, labels, gen) -> torch.Tensor:
    """MSE to the scheduler's prediction target (velocity or noise)."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    xt = sched.add_noise(x0, noise, t)
    target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    pred = model(xt, timestep=t, class_labels=labels).sample
    return F.mse_loss(pred, target)


def _preview(model, path: Path, scheduler_config: dict, steps: int = 25, image_size: int = 8) -> float | None:
    """Write a 10x4 grid of samples; return the classifier's accuracy on them if one exists
    (16x16 samples are 2x2 average-pooled to the classifier's 8x8)."""
    from .metrics import save_grid
    from .mmdit import to_classifier_space
    from .model import load_classifier
    from .sampling import sample

    labels = torch.arange(10).repeat_interleave(4)
    imgs = sample(model, labels, num_inference_steps=steps, guidance_scale=2.0, seed=1000,
                  scheduler_config=scheduler_config, image_size=image_size)
    save_grid(imgs, path, nrow=10, col_major=True)
    try:
        clf = load_classifier()
    except FileNotFoundError:
        return None
    return _classifier_accuracy(clf, to_classifier_space(imgs), labels)


def train_dit(steps: int = 4000, batch_size: int = 128, lr: float = 1e-3, seed: int | None = None,
              ema_decay: float = 0.999, eval_every: int = 500, out_dir: Path = WEIGHTS_DIR,
              preview_dir: Path = Path("runs/reference"), name: str = DIT_NAME) -> None:
    """Train DiT ``name`` of ``model.DIT_VARIANTS`` (its config, schedule and seed unless ``seed``
    is given); the EMA weights are saved to ``out_dir`` at every evaluation."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    model_config, scheduler_config, default_seed = DIT_VARIANTS[name]
    seed = default_seed if seed is None else seed
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (xtr, ytr), (xte, yte) = data.train_test_split()
    image_size = model_config.get("sample_size", data.IMAGE_SIZE)
    if image_size != data.IMAGE_SIZE:  # dit_cosine: 16x16, the digits upsampled as for the MMDiT
        from .mmdit import upsample_digits

        xtr, xte = upsample_digits(xtr), upsample_digits(xte)
    model = build_dit(model_config)
    ema = copy.deepcopy(model).requires_grad_(False)
    # eval(): diffusers' LabelEmbedding would otherwise drop labels independently in every block;
    # we drop them once per sample below (the blocks have no dropout of their own).
    model.eval()
    ema.eval()
    sched = DDPMScheduler(**scheduler_config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    preview_dir.mkdir(parents=True, exist_ok=True)
    history = []
    t0 = time.time()
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        idx = torch.randint(0, len(ytr), (batch_size,), generator=gen)
        labels = torch.where(torch.rand(batch_size, generator=gen) < 0.1, NULL_CLASS, ytr[idx])
        loss = _loss(model, sched, xtr[idx], labels, gen)
        optimizer_step(model, ema, opt, loss, step, ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                held = float(_loss(ema, sched, xte, yte, torch.Generator().manual_seed(123)))
            acc = _preview(ema, preview_dir / f"{name}_step{step + 1:05d}.png", scheduler_config,
                           image_size=image_size)
            history.append({"step": step + 1, "train_loss": loss.item(), "held_out_loss": held,
                            "preview_class_accuracy": acc, "elapsed_s": round(time.time() - t0, 1)})
            tqdm.write(str(history[-1]))
            save_model(ema, name, {
                "model_class": "DiTTransformer2DModel", "model_config": model_config,
                "scheduler_config": scheduler_config, "null_class": NULL_CLASS,
                "training": {"steps": step + 1, "batch_size": batch_size, "lr": lr, "seed": seed,
                             "ema_decay": ema_decay, "label_dropout": 0.1, "grad_clip": 1.0,
                             "data": "sklearn load_digits 8x8, [-1,1], train split"
                                     + ("" if image_size == 8 else ", upsampled bilinearly to 16x16"),
                             "history": history},
            }, out_dir)


def main(argv=None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mmdit"]:  # the second reference model has its own flags (--resume, --finalize...)
        from . import train_mmdit

        train_mmdit.main(argv[1:])
        return
    if argv[:1] == ["wan"]:  # the video model: reference/train_wan.py
        from . import train_wan

        train_wan.main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["classifier", "dit", "dit_unseen", "dit_cosine", "all", "mmdit", "wan"])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    a = p.parse_args(argv)
    if a.what in ("classifier", "all"):
        train_classifier(out_dir=a.out_dir)
    if a.what in ("dit", "all"):
        train_dit(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, out_dir=a.out_dir)
    if a.what in ("dit_unseen", "dit_cosine"):
        train_dit(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, out_dir=a.out_dir,
                  name=a.what)


if __name__ == "__main__":
    main()
