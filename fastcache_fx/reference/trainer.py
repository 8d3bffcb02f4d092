"""The resumable training loop the flow-matching reference models share (AdamW, EMA, checkpoints).

Every ``eval_every`` steps (and at the last step) the EMA is scored, saved to the package (a
stopped run leaves a usable model) and the full training state goes to
``<run_dir>/checkpoint.pt`` for ``resume``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable

import torch

from .model import save_model
from .optim import lr_at, optimizer_step


def fit(name: str, model: torch.nn.Module, loss_fn: Callable, held_out_loss: Callable, evaluate: Callable,
        record: Callable[[dict], dict], *, steps: int, batch_size: int, lr: float, seed: int, ema_decay: float,
        eval_every: int, out_dir: Path, run_dir: Path, resume: bool, info: dict) -> None:
    """Train ``model`` (a ``ModuleDict``; its EMA is what ships as ``<out_dir>/<name>.*``).

    ``loss_fn(model, step, gen)`` -> scalar training loss of one batch; ``held_out_loss(ema)`` ->
    float; ``evaluate(ema, step)`` -> dict merged into the history row; ``record(training)`` -> the
    JSON record saved beside the weights; ``batch_size``: the batch ``loss_fn`` draws (checked and
    recorded here); ``info``: further fixed fields of ``training`` (objective, data...).

    Raises:
        ValueError: a non-positive ``steps``, ``batch_size``, ``lr`` or ``eval_every``.
        FileNotFoundError: ``resume`` without ``<run_dir>/checkpoint.pt``.
    """
    from tqdm.auto import tqdm

    for key, v in (("steps", steps), ("batch_size", batch_size), ("lr", lr), ("eval_every", eval_every)):
        if not v > 0:
            raise ValueError(f"{key}: expected > 0, got {v!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    start, elapsed0, history, loss_history, resumes = 0, 0.0, [], [], []
    if resume:
        if not ckpt.exists():
            raise FileNotFoundError(f"resume: no checkpoint at {ckpt}")
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        start, elapsed0 = st["step"], st["elapsed_s"]
        history, loss_history, resumes = st["history"], st["loss_history"], st.get("resumes", [])
        resumes.append({"at_step": start, "total_steps": steps})
    t0, running = time.time(), []
    bar = tqdm(range(start, steps), desc=name, initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss = loss_fn(model, step, gen)
        optimizer_step(model, ema, opt, loss, step, ema_decay)
        running.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            loss_history.append([step + 1, round(sum(running) / len(running), 5)])
            running = []
        if (step + 1) % eval_every and step + 1 != steps:
            continue
        elapsed = round(elapsed0 + time.time() - t0, 1)
        with torch.no_grad():
            held = float(held_out_loss(ema))
        row = {"step": step + 1, "train_loss": loss_history[-1][1] if loss_history else loss.item(),
               "held_out_loss": round(held, 5), **evaluate(ema, step + 1), "elapsed_s": elapsed}
        history.append(row)
        tqdm.write(str(row))
        training = {**info, "batch_size": batch_size, "steps": step + 1, "planned_steps": steps, "lr": lr, "seed": seed,
                    "optimizer": "AdamW(weight_decay=0), 200 warmup steps, cosine decay to 0.1 lr",
                    "ema_decay": ema_decay, "grad_clip": 1.0, "threads": torch.get_num_threads(),
                    "elapsed_s": elapsed, "resumes": resumes, "history": history,
                    "loss_history_every_50": loss_history}
        save_model(ema, name, record(training), out_dir)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step + 1, "elapsed_s": elapsed, "history": history,
                    "loss_history": loss_history, "resumes": resumes}, ckpt)


def main(name: str, doc: str, argv, train: Callable, finalize: Callable, *, steps: int, batch_size: int,
         eval_every: int, guidance: float, threads: int) -> None:
    """The command line both trainers share (``python -m fastcache_fx.reference.train mmdit|wan``):
    train (or, with ``--finalize``, only re-evaluate) and write ``docs/<name>_samples.png`` when the
    weights go to the package. ``train(**flags)`` and ``finalize(guidance, out_dir, notes,
    grid_png)`` are the model's; the keyword arguments are the flags' defaults."""
    from .model import WEIGHTS_DIR

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=steps, help=f"total steps (the shipped model: {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--guidance", type=float, default=guidance, help="CFG scale of the evaluations")
    p.add_argument("--out-dir", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--run-dir", type=Path, default=Path("runs") / name, help="checkpoint and preview grids")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    p.add_argument("--finalize", action="store_true", help="only evaluate the shipped weights, write the grid")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch threads (on the shared 2-core machine 1 was faster for the MMDiT: 1.5 s/step "
                        "vs 2-5 s with 2, and leaves a core free)")
    p.add_argument("--note", action="append", default=[], help="a sentence for training.notes of the JSON (repeatable)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not a.finalize:
        train(steps=a.steps, batch_size=a.batch_size, lr=a.lr, eval_every=a.eval_every, guidance=a.guidance,
              out_dir=a.out_dir, run_dir=a.run_dir, resume=a.resume)
    finalize(guidance=a.guidance, out_dir=a.out_dir, notes=a.note,
             grid_png=Path(f"docs/{name}_samples.png") if a.out_dir == WEIGHTS_DIR else a.run_dir / "samples.png")
