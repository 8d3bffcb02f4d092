"""The second bundled reference model: a flow-matching MMDiT (diffusers ``SD3Transformer2DModel``).

Joint text/image attention as in Stable Diffusion 3 (Esser et al. 2024, arXiv 2403.03206):
6 ``JointTransformerBlock`` s of width 128 (4 heads x 32), the last one ``context_pre_only``, on
16x16x1 pixels (scikit-learn's 8x8 digits upsampled bilinearly) at patch size 2, i.e. 64 image
tokens. The model works in pixel space: there is no VAE, the pipeline's "latents" are the images.

No text encoder is available offline, so the "prompt" is a class label: ``ClassEmbedder`` (a
small learned module trained jointly with the transformer and shipped with it) maps a label in
0..9, or the learned null class 10 used for classifier-free guidance, to
``encoder_hidden_states`` [B, 4, 64] (the role of the T5/CLIP token embeddings) and
``pooled_projections`` [B, 64] (the role of the pooled CLIP embeddings).

Both modules ship in one safetensors file (keys ``transformer.*`` and ``embedder.*``) beside a
JSON file holding the model config, the embedder config, the scheduler config and the training
record. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .model import WEIGHTS_DIR, _paths, load_record

MMDIT_NAME = "mmdit"
NUM_DIGITS = 10
#: Label of the learned null embedding (classifier-free guidance, label dropout in training).
MMDIT_NULL_CLASS = 10
IMAGE_SIZE = 16

#: SD3Transformer2DModel config: 6 joint blocks, width 128 (4 heads x 32), 16x16x1 pixels, patch 2.
MMDIT_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    patch_size=2,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=128,  # = width: the context stream has the image stream's width
    pooled_projection_dim=64,
    pos_embed_max_size=8,  # 16 / patch 2 = an 8x8 token grid
)

#: ClassEmbedder config: 11 labels (10 digits + null), 4 context tokens of width 64, pooled 64.
EMBEDDER_CONFIG = dict(
    num_classes=NUM_DIGITS + 1,
    num_tokens=4,
    joint_attention_dim=MMDIT_CONFIG["joint_attention_dim"],
    pooled_projection_dim=MMDIT_CONFIG["pooled_projection_dim"],
)

#: FlowMatchEulerDiscreteScheduler config used for sampling (sigma = timestep / 1000, no shift).
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


class ClassEmbedder(ModelMixin, ConfigMixin):
    """Learned stand-in for SD3's text encoders: a class label -> (token embeddings, pooled embedding).

    Label ``num_classes - 1`` is the null ("empty prompt") class, learned through label dropout
    and used as the negative prompt of classifier-free guidance.

    ``forward(labels [B] int64)`` returns ``(encoder_hidden_states [B, num_tokens,
    joint_attention_dim], pooled_projections [B, pooled_projection_dim])`` in float32; the
    tables start as N(0, 1) like unit-scale text-encoder outputs.

    Raises:
        ValueError: a size in the config is < 1, or a label is outside 0..num_classes-1.
    """

    @register_to_config
    def __init__(self, num_classes: int = 11, num_tokens: int = 4, joint_attention_dim: int = 64,
                 pooled_projection_dim: int = 64) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("num_tokens", num_tokens),
                        ("joint_attention_dim", joint_attention_dim), ("pooled_projection_dim", pooled_projection_dim)):
            if int(v) < 1:
                raise ValueError(f"{name}: expected >= 1, got {v!r}")
        self.tokens = nn.Embedding(num_classes, num_tokens * joint_attention_dim)
        self.pooled = nn.Embedding(num_classes, pooled_projection_dim)
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.pooled.weight, std=1.0)

    @property
    def null_class(self) -> int:
        """The label of the learned null embedding (the last one)."""
        return self.config.num_classes - 1

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.tokens.weight.device).flatten()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.config.num_classes):
            raise ValueError(f"labels: expected values in 0..{self.config.num_classes - 1}, got {labels.tolist()}")
        ehs = self.tokens(labels).view(-1, self.config.num_tokens, self.config.joint_attention_dim)
        return ehs, self.pooled(labels)

    def prompt_kwargs(self, labels) -> dict:
        """``StableDiffusion3Pipeline`` keyword arguments for classes ``labels`` [B]: ``prompt_embeds``,
        ``pooled_prompt_embeds`` and, from the null class, ``negative_prompt_embeds`` /
        ``negative_pooled_prompt_embeds`` (each [B, ...], no gradient)."""
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        with torch.no_grad():
            pe, pp = self(labels)
            ne, npool = self(torch.full_like(labels, self.null_class))
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pp,
                "negative_prompt_embeds": ne, "negative_pooled_prompt_embeds": npool}


def build_mmdit(config: dict | None = None):
    """A fresh (randomly initialised) reference ``SD3Transformer2DModel`` (``MMDIT_CONFIG``)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**(config or MMDIT_CONFIG))


def upsample_digits(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 8, 8] digits in [-1, 1] -> [B, 1, 16, 16] by bilinear interpolation
    (``align_corners=False``), the MMDiT's training data.

    Raises:
        ValueError: ``x`` is not [B, 1, 8, 8].
    """
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"x: expected [B, 1, 8, 8], got {tuple(x.shape)}")
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


def to_classifier_space(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, 16, 16] MMDiT samples -> [B, 1, 8, 8] by 2x2 average pooling, the input of the
    bundled 8x8 digit classifier (class accuracy, digits-FID). [B, 1, 8, 8] passes unchanged.

    Raises:
        ValueError: ``x`` is neither [B, 1, 16, 16] nor [B, 1, 8, 8].
    """
    if x.ndim != 4 or tuple(x.shape[1:]) not in ((1, IMAGE_SIZE, IMAGE_SIZE), (1, 8, 8)):
        raise ValueError(f"x: expected [B, 1, 16, 16] or [B, 1, 8, 8], got {tuple(x.shape)}")
    return x if x.shape[-1] == 8 else F.avg_pool2d(x, 2)


def bundle(transformer: nn.Module, embedder: nn.Module) -> nn.ModuleDict:
    """The two modules as one state dict (keys ``transformer.*``, ``embedder.*``) for saving."""
    return nn.ModuleDict({"transformer": transformer, "embedder": embedder})


def load_mmdit_record(weights_dir: Path | None = None) -> dict:
    """The JSON record beside the bundled MMDiT (configs, training record, class accuracy).

    Raises:
        FileNotFoundError: not trained yet (``python -m fastcache_fx.reference.train mmdit``).
    """
    try:
        return load_record(MMDIT_NAME, weights_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; run python -m fastcache_fx.reference.train mmdit") from None


def load_mmdit(weights_dir: Path | None = None) -> tuple[nn.Module, ClassEmbedder]:
    """(transformer, embedder): the bundled MMDiT and its class embedder, eval mode, fp32, CPU,
    loaded offline from ``mmdit.safetensors``. Each call returns new modules (own cache state).

    Raises:
        FileNotFoundError: the weights are not in the package.
    """
    from safetensors.torch import load_file

    record = load_mmdit_record(weights_dir)
    transformer = build_mmdit(record["model_config"])
    embedder = ClassEmbedder(**record["embedder_config"])
    st, _ = _paths(MMDIT_NAME, weights_dir if weights_dir is not None else WEIGHTS_DIR)
    bundle(transformer, embedder).load_state_dict(load_file(str(st)))
    return transformer.eval().requires_grad_(False), embedder.eval().requires_grad_(False)


def flow_scheduler_config(weights_dir: Path | None = None) -> dict:
    """The FlowMatchEulerDiscreteScheduler config recorded with the bundled MMDiT (default if absent)."""
    try:
        return dict(load_mmdit_record(weights_dir)["scheduler_config"])
    except FileNotFoundError:
        return dict(FLOW_SCHEDULER_CONFIG)
