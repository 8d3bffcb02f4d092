"""The third bundled reference model: a video DiT (diffusers ``WanTransformer3DModel``).

Wan 2.1's block (self-attention with 3-D rotary, cross-attention to the text tokens, feed-forward,
AdaLN from the timestep; Wan Team 2025, arXiv 2503.20314): 6 blocks of width 128 (4 heads x 32),
on clips of 4 frames of 12x12 pixels at patch (1, 2, 2), i.e. 4 x 36 = 144 tokens. The model works
in pixel space: there is no VAE, the pipeline's "latents" are the frames.

Data: a scikit-learn 8x8 digit on a 12x12 canvas (background -1) that moves one pixel per frame in
one of four directions (``MOTIONS``), made in code from the bundled digits (``moving_clips``).

The "prompt" is (digit, motion): ``PromptEmbedder`` (trained with the transformer, shipped in the
same safetensors file, keys ``transformer.*`` / ``embedder.*``) maps it to ``prompt_embeds``
[B, 4, 64], the role of Wan's umT5 token embeddings: two learned tokens for the digit and two for
the motion. Index 10 (digit) and 4 (motion) are the learned null tokens of the negative prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .model import WEIGHTS_DIR, _paths, load_record

WAN_NAME = "wan"
NUM_DIGITS = 10
CANVAS = 12
FRAMES = 4
DIGIT = 8
#: (dy, dx) pixels per frame of each motion label
MOTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
MOTION_NAMES = tuple(MOTIONS)

#: WanTransformer3DModel config: 6 blocks, width 128 (4 heads x 32), 1 channel, patch (1, 2, 2).
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    out_channels=1,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)

#: PromptEmbedder config: 10 digits, 4 motions, 2 tokens each, width text_dim.
EMBEDDER_CONFIG = dict(num_digits=NUM_DIGITS, num_motions=len(MOTIONS), tokens_per_part=2,
                       text_dim=WAN_CONFIG["text_dim"])

#: UniPCMultistepScheduler config used for sampling (the scheduler Wan ships with, flow sigmas).
WAN_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                            flow_shift=3.0)


class PromptEmbedder(ModelMixin, ConfigMixin):
    """Learned stand-in for Wan's text encoder: (digit, motion) -> ``prompt_embeds``.

    ``forward(digits [B], motions [B])`` (int64; digit ``num_digits`` and motion ``num_motions``
    are the null tokens) returns [B, 2 * tokens_per_part, text_dim] float32: the digit's tokens
    followed by the motion's. The tables start as N(0, 1), like unit-scale encoder outputs.

    Raises:
        ValueError: a size in the config is < 1, or a label is out of range.
    """

    @register_to_config
    def __init__(self, num_digits: int = 10, num_motions: int = 4, tokens_per_part: int = 2,
                 text_dim: int = 64) -> None:
        super().__init__()
        for name, v in (("num_digits", num_digits), ("num_motions", num_motions),
                        ("tokens_per_part", tokens_per_part), ("text_dim", text_dim)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected >= 1, got {v!r}")
        self.digit_tokens = nn.Embedding(num_digits + 1, tokens_per_part * text_dim)
        self.motion_tokens = nn.Embedding(num_motions + 1, tokens_per_part * text_dim)
        nn.init.normal_(self.digit_tokens.weight, std=1.0)
        nn.init.normal_(self.motion_tokens.weight, std=1.0)

    def forward(self, digits: torch.Tensor, motions: torch.Tensor) -> torch.Tensor:
        c = self.config
        d = _labels(digits, c.num_digits, "digits", self.digit_tokens.weight.device)
        m = _labels(motions, c.num_motions, "motions", self.motion_tokens.weight.device)
        if d.shape != m.shape:
            raise ValueError(f"digits, motions: expected the same length, got {d.numel()} and {m.numel()}")
        tokens = torch.cat([self.digit_tokens(d), self.motion_tokens(m)], dim=1)
        return tokens.view(len(d), 2 * c.tokens_per_part, c.text_dim)

    def prompt_kwargs(self, digits, motions) -> dict:
        """``WanPipeline`` keyword arguments: ``prompt_embeds`` and, from the null tokens,
        ``negative_prompt_embeds`` (each [B, 4, text_dim], no gradient)."""
        d = torch.as_tensor(digits, dtype=torch.long).flatten()
        m = torch.as_tensor(motions, dtype=torch.long).flatten()
        with torch.no_grad():
            return {"prompt_embeds": self(d, m),
                    "negative_prompt_embeds": self(torch.full_like(d, self.config.num_digits),
                                                   torch.full_like(m, self.config.num_motions))}


def _labels(x, n: int, name: str, device) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.long, device=device).flatten()
    if x.numel() and (x.min() < 0 or x.max() > n):
        raise ValueError(f"{name}: expected values in 0..{n} ({n} = null), got {x.tolist()}")
    return x


def build_wan(config: dict | None = None):
    """A fresh (randomly initialised) reference ``WanTransformer3DModel`` (``WAN_CONFIG``)."""
    from diffusers import WanTransformer3DModel

    cfg = dict(config or WAN_CONFIG)
    cfg["patch_size"] = tuple(cfg["patch_size"])
    return WanTransformer3DModel(**cfg)


def _motion_range(step: int) -> list[int]:
    """Start coordinates along one axis that keep the digit on the canvas for ``FRAMES`` frames."""
    travel = step * (FRAMES - 1)
    lo, hi = max(0, -travel), CANVAS - DIGIT - max(0, travel)
    return list(range(lo, hi + 1))


def moving_clips(digits: torch.Tensor, motions: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Clips of digits moving one pixel per frame: [N, 1, FRAMES, CANVAS, CANVAS] in [-1, 1].

    ``digits`` [N, 1, 8, 8] in [-1, 1]; ``motions`` [N] indices into ``MOTION_NAMES``;
    ``starts`` [N, 2] (y, x) of the digit's top-left corner at frame 0.

    Raises:
        ValueError: a shape is wrong, or a digit would leave the canvas.
    """
    if digits.ndim != 4 or tuple(digits.shape[1:]) != (1, DIGIT, DIGIT):
        raise ValueError(f"digits: expected [N, 1, 8, 8], got {tuple(digits.shape)}")
    n = digits.shape[0]
    out = torch.full((n, 1, FRAMES, CANVAS, CANVAS), -1.0)
    for i in range(n):
        dy, dx = MOTIONS[MOTION_NAMES[int(motions[i])]]
        y0, x0 = int(starts[i, 0]), int(starts[i, 1])
        for f in range(FRAMES):
            y, x = y0 + f * dy, x0 + f * dx
            if not (0 <= y <= CANVAS - DIGIT and 0 <= x <= CANVAS - DIGIT):
                raise ValueError(f"starts: clip {i} leaves the canvas at frame {f}")
            out[i, 0, f, y:y + DIGIT, x:x + DIGIT] = digits[i, 0]
    return out


def random_clips(images: torch.Tensor, labels: torch.Tensor, batch: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random batch of training clips: (clips [batch, 1, F, 12, 12], digits [batch], motions [batch])
    from ``images`` [N, 1, 8, 8] / ``labels`` [N], uniform over digit, motion and start position."""
    idx = torch.randint(0, len(labels), (batch,), generator=gen)
    motions = torch.randint(0, len(MOTIONS), (batch,), generator=gen)
    starts = torch.zeros(batch, 2, dtype=torch.long)
    for i in range(batch):
        for axis, step in enumerate(MOTIONS[MOTION_NAMES[int(motions[i])]]):
            r = _motion_range(step)
            starts[i, axis] = r[int(torch.randint(0, len(r), (1,), generator=gen))]
    return moving_clips(images[idx], motions, starts), labels[idx], motions


def frames_to_classifier(video: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, 12, 12] clips -> [B * F, 1, 8, 8]: in each frame the 8x8 window holding the most
    ink (sum of x + 1), the input of the bundled digit classifier (per-frame class accuracy)."""
    b, _, f, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, 1, h, w)
    ink = F.avg_pool2d(frames + 1, DIGIT, stride=1).flatten(1)  # [B*F, windows]
    best = ink.argmax(1)
    side = w - DIGIT + 1
    ys, xs = (best // side).tolist(), (best % side).tolist()
    return torch.stack([frames[i, :, y:y + DIGIT, x:x + DIGIT] for i, (y, x) in enumerate(zip(ys, xs))])


def motion_compensated_psnr(video: torch.Tensor, motions) -> torch.Tensor:
    """Temporal consistency per clip, dB [B]: the PSNR (data range 2) between frame k + 1 and frame k
    moved by the clip's known motion, over the pixels both frames share, averaged over the F - 1
    pairs. A digit that keeps its shape scores high; flicker (strokes that appear, vanish or change
    between frames) lowers it. ``video`` [B, 1, F, H, W] in [-1, 1]; ``motions`` [B] indices."""
    vals = []
    for i in range(video.shape[0]):
        dy, dx = MOTIONS[MOTION_NAMES[int(motions[i])]]
        prev = video[i, 0, :-1].double()
        nxt = video[i, 0, 1:].double()
        moved = torch.roll(prev, shifts=(dy, dx), dims=(1, 2))
        # the row or column that roll wrapped around is not shared by both frames
        keep = torch.ones_like(moved[0], dtype=torch.bool)
        if dy:
            keep[0 if dy > 0 else -1, :] = False
        if dx:
            keep[:, 0 if dx > 0 else -1] = False
        mse = (moved - nxt)[:, keep].pow(2).mean(1)
        vals.append((10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean())
    return torch.stack(vals).float()


def load_wan_record(weights_dir: Path | None = None) -> dict:
    """The JSON record beside the bundled Wan model (configs, training record, evaluation).

    Raises:
        FileNotFoundError: not trained yet (``python -m fastcache_fx.reference.train wan``).
    """
    try:
        return load_record(WAN_NAME, weights_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; run python -m fastcache_fx.reference.train wan") from None


def load_wan(weights_dir: Path | None = None) -> tuple[nn.Module, PromptEmbedder]:
    """(transformer, embedder): the bundled Wan model and its prompt embedder, eval mode, fp32,
    CPU, loaded offline from ``wan.safetensors``. Each call returns new modules (own cache state).

    Raises:
        FileNotFoundError: the weights are not in the package.
    """
    from safetensors.torch import load_file

    from .mmdit import bundle

    record = load_wan_record(weights_dir)
    transformer = build_wan(record["model_config"])
    embedder = PromptEmbedder(**record["embedder_config"])
    st, _ = _paths(WAN_NAME, weights_dir if weights_dir is not None else WEIGHTS_DIR)
    bundle(transformer, embedder).load_state_dict(load_file(str(st)))
    return transformer.eval().requires_grad_(False), embedder.eval().requires_grad_(False)


def wan_scheduler_config(weights_dir: Path | None = None) -> dict:
    """The UniPC scheduler config recorded with the bundled Wan model (default if absent)."""
    try:
        return dict(load_wan_record(weights_dir)["scheduler_config"])
    except FileNotFoundError:
        return dict(WAN_SCHEDULER_CONFIG)
