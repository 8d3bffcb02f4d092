"""Train the reference Wan video DiT (``WanTransformer3DModel`` + ``PromptEmbedder``) with rectified flow.

    python -m fastcache_fx.reference.train wan               # the shipped run: see the JSON record
    python -m fastcache_fx.reference.train wan --resume      # continue a stopped run
    python -m fastcache_fx.reference.train wan --finalize    # re-evaluate the shipped weights

Data: clips of scikit-learn's 8x8 digits (train split, [-1, 1]) moving one pixel per frame on a
12x12 canvas (``wan.random_clips``: digit, motion and start position uniform), 4 frames.

Objective (rectified flow, as the MMDiT; Liu et al. 2022, arXiv 2209.03003; Esser et al. 2024,
arXiv 2403.03206 section 3.1): sigma ~ logit-normal(0, 1), x_sigma = (1 - sigma) x0 + sigma
noise, ``timestep = 1000 sigma``, loss = MSE(v_pred, noise - x0). Prompt dropout 0.1 (digit and
motion both to their null tokens) trains the unconditional branch for CFG. AdamW, EMA, gradient
clipping 1.0, fixed seeds (``trainer.fit``). Evaluation: 40 clips (each digit x each motion)
sampled by the real ``WanPipeline``, per-frame class accuracy with the bundled 8x8 classifier on
the inkiest 8x8 window of each frame, and the motion-compensated PSNR between consecutive frames.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .metrics import class_accuracy, save_grid
from .mmdit import bundle
from .model import WEIGHTS_DIR, load_classifier, save_model
from . import trainer
from .trainer import fit
from .wan import (
    EMBEDDER_CONFIG, FRAMES, MOTION_NAMES, WAN_CONFIG, WAN_NAME, WAN_SCHEDULER_CONFIG, PromptEmbedder, build_wan,
    frames_to_classifier, load_wan, load_wan_record, motion_compensated_psnr, random_clips,
)
from .wan_sampling import sample_wan

PROMPT_DROPOUT = 0.1
EVAL_STEPS = 20
EVAL_SEED = 1000
DEFAULT_GUIDANCE = 4.0
#: the small sample the tests reproduce: digits 0..9, motion i % 4, seeds 5000..5009
TEST_SAMPLE = dict(count=10, seed=5000, steps=EVAL_STEPS)


def flow_matching_loss(transformer, embedder, x0: torch.Tensor, digits: torch.Tensor, motions: torch.Tensor,
                       gen: torch.Generator) -> torch.Tensor:
    """Rectified-flow loss: mean over elements of (v_pred - (noise - x0))^2; x0 [B, 1, F, 12, 12]
    in [-1, 1]; digits, motions [B] (null tokens allowed); sigma ~ logit-normal(0, 1) per sample."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.sigmoid(torch.randn(b, generator=gen))
    s = sigma.view(b, 1, 1, 1, 1)
    pred = transformer((1 - s) * x0 + s * noise, timestep=sigma * 1000,
                       encoder_hidden_states=embedder(digits, motions)).sample
    return F.mse_loss(pred, noise - x0)


def eval_prompts(count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(digits, motions) of the evaluation clips: every digit with every motion (40), or the first
    ``count`` of digits 0..9 with motion ``i % 4``."""
    if count is not None:
        i = torch.arange(count)
        return i % 10, i % len(MOTION_NAMES)
    d = torch.arange(10).repeat_interleave(len(MOTION_NAMES))
    return d, torch.arange(len(MOTION_NAMES)).repeat(10)


def score(clips: torch.Tensor, digits: torch.Tensor, motions: torch.Tensor, classifier=None) -> dict:
    """Per-frame class accuracy and mean motion-compensated PSNR (dB) of clips [B, 1, F, 12, 12]."""
    clf = classifier or load_classifier()
    acc = class_accuracy(clf, frames_to_classifier(clips), digits.repeat_interleave(clips.shape[2]))
    return {"frame_class_accuracy": acc, "temporal_psnr_db": float(motion_compensated_psnr(clips, motions).mean())}


def evaluate(transformer, embedder, guidance: float = DEFAULT_GUIDANCE, seed: int = EVAL_SEED,
             steps: int = EVAL_STEPS, count: int | None = None) -> tuple[dict, torch.Tensor]:
    """Sample the evaluation clips (sample i seeded ``seed + i``) and score them.
    Returns (metrics, clips [N, 1, F, 12, 12])."""
    digits, motions = eval_prompts(count)
    clips = sample_wan(transformer, embedder, digits, motions, num_inference_steps=steps, guidance_scale=guidance,
                       seed=seed)
    return {**score(clips, digits, motions), "samples": len(digits), "steps": steps, "guidance_scale": guidance,
            "seed": seed}, clips


def strip(clips: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] -> [B * F, 1, H, W], frames of a clip side by side in a grid row."""
    return clips.permute(0, 2, 1, 3, 4).reshape(-1, 1, *clips.shape[-2:])


def _record(training: dict, evaluation: dict | None = None) -> dict:
    return {
        "model_class": "WanTransformer3DModel", "model_config": WAN_CONFIG,
        "embedder_class": "fastcache_fx.reference.wan.PromptEmbedder", "embedder_config": EMBEDDER_CONFIG,
        "scheduler_class": "UniPCMultistepScheduler", "scheduler_config": WAN_SCHEDULER_CONFIG,
        "motions": list(MOTION_NAMES), "frames": FRAMES, "canvas": 12,
        "pipeline": "diffusers.WanPipeline, text encoder/tokenizer/vae None, prompt_embeds and "
                    "negative_prompt_embeds from the embedder, output_type='latent' (pixel space)",
        "classifier_input": "per frame, the 8x8 window with the most ink, for the bundled 8x8 classifier",
        "training": training, "evaluation": evaluation or {},
    }


def train_wan(steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0, ema_decay: float = 0.999,
              eval_every: int = 500, guidance: float = DEFAULT_GUIDANCE, out_dir: Path = WEIGHTS_DIR,
              run_dir: Path = Path("runs/wan"), resume: bool = False) -> None:
    """Train the Wan model and its prompt embedder (``trainer.fit``); the EMA ships.

    Raises:
        ValueError: a non-positive ``steps``, ``batch_size``, ``lr`` or ``eval_every``.
        FileNotFoundError: ``resume`` without ``<run_dir>/checkpoint.pt``.
    """
    (xtr, ytr), (xte, yte) = data.train_test_split()
    null_d, null_m = EMBEDDER_CONFIG["num_digits"], EMBEDDER_CONFIG["num_motions"]
    held_gen = torch.Generator().manual_seed(123)
    held = random_clips(xte, yte, 256, held_gen)

    def loss_fn(model, step, gen):
        clips, d, m = random_clips(xtr, ytr, batch_size, gen)
        drop = torch.rand(batch_size, generator=gen) < PROMPT_DROPOUT
        d, m = torch.where(drop, null_d, d), torch.where(drop, null_m, m)
        return flow_matching_loss(model["transformer"], model["embedder"], clips, d, m, gen)

    def held_out(ema):
        return flow_matching_loss(ema["transformer"], ema["embedder"], *held, torch.Generator().manual_seed(7))

    def preview(ema, step):
        ev, clips = evaluate(ema["transformer"], ema["embedder"], guidance=guidance)
        save_grid(strip(clips), run_dir / f"step{step:05d}.png", nrow=FRAMES * len(MOTION_NAMES), scale=3)
        return {"preview_" + k: ev[k] for k in ("frame_class_accuracy", "temporal_psnr_db")}

    torch.manual_seed(seed)
    model = bundle(build_wan(), PromptEmbedder(**EMBEDDER_CONFIG))
    info = {"prompt_dropout": PROMPT_DROPOUT, "preview_guidance": guidance,
            "sigma_sampling": "logit-normal(0, 1): sigma = sigmoid(n), n ~ N(0, 1)",
            "objective": "rectified flow: x = (1-sigma) x0 + sigma noise, timestep = 1000 sigma, MSE(v_pred, noise - x0)",
            "data": "sklearn load_digits 8x8 train split, [-1,1], moving 1 px/frame on a 12x12 canvas, 4 frames"}
    fit(WAN_NAME, model, loss_fn, held_out, preview, _record, steps=steps, lr=lr, seed=seed, ema_decay=ema_decay,
        eval_every=eval_every, out_dir=out_dir, run_dir=run_dir, resume=resume,
        batch_size=batch_size, info=info)


def finalize(guidance: float = DEFAULT_GUIDANCE, out_dir: Path = WEIGHTS_DIR,
             grid_png: Path | None = Path("docs/wan_samples.png"), sweep=(2.0, 3.0, 4.0, 5.0),
             notes: list[str] | None = None) -> dict:
    """Evaluate the shipped weights and write the ``evaluation`` section of the JSON record: the
    40 evaluation clips at CFG ``guidance`` and at each scale of ``sweep``, and the small sample
    the tests reproduce; writes the sample grid (one row per digit: 4 motions x 4 frames).

    Raises:
        FileNotFoundError: no shipped weights in ``out_dir``.
    """
    transformer, embedder = load_wan(out_dir)
    record = load_wan_record(out_dir)
    if notes:
        record["training"].setdefault("notes", []).extend(notes)
    main, clips = evaluate(transformer, embedder, guidance=guidance)
    by_guidance = {str(g): {k: v for k, v in evaluate(transformer, embedder, guidance=g)[0].items()
                            if k in ("frame_class_accuracy", "temporal_psnr_db")} for g in sweep}
    tp = TEST_SAMPLE
    small, _ = evaluate(transformer, embedder, guidance=guidance, seed=tp["seed"], steps=tp["steps"],
                        count=tp["count"])
    record["evaluation"] = {**main, "by_guidance": by_guidance, "test_sample": small,
                            "sampler": "WanPipeline + UniPCMultistepScheduler (flow sigmas), separate cond / "
                                       "uncond calls; clip i seeded seed + i"}
    save_model(bundle(transformer, embedder), WAN_NAME, record, out_dir)
    if grid_png is not None:
        Path(grid_png).parent.mkdir(parents=True, exist_ok=True)
        save_grid(strip(clips), grid_png, nrow=FRAMES * len(MOTION_NAMES), scale=6)
    print({k: v for k, v in record["evaluation"].items() if k != "sampler"})
    return record["evaluation"]


def main(argv=None) -> None:
    trainer.main(WAN_NAME, __doc__, argv, train_wan, finalize, steps=2000, batch_size=64, eval_every=500,
                 guidance=DEFAULT_GUIDANCE, threads=1)


if __name__ == "__main__":
    main()
