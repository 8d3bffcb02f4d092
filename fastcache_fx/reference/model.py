"""The bundled reference models: a class-conditional DiT and a digit classifier.

The DiT is diffusers' real ``DiTTransformer2DModel`` (ada_norm_zero blocks, as DiT-XL/2) at
8x8 pixels with patch size 1, i.e. 64 tokens. Weights ship as safetensors beside a JSON file
holding the model config, the noise-scheduler config and the training record; nothing is
downloaded.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

WEIGHTS_DIR = Path(str(resources.files("fastcache_fx.reference") / "weights"))
DIT_NAME = "dit"
CLASSIFIER_NAME = "classifier"

#: DiT config: 6 ada_norm_zero blocks of width 128 (4 heads x 32) on 8x8x1 pixels, patch 1.
DIT_CONFIG = dict(
    sample_size=8,
    patch_size=1,
    in_channels=1,
    out_channels=1,
    num_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    num_embeds_ada_norm=10,  # 10 digit classes; diffusers adds the null class (id 10) for CFG
)
NULL_CLASS = 10

#: Noise-schedule config shared by training and sampling (diffusers scheduler config keys).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,  # clipping x0 broke DDIM sampling of this v-prediction model (20% class accuracy)
)

#: The unseen DiT (issue 25): a variant nothing in the library is tuned on, frozen before the
#: output-level quality knob was designed. Deeper and narrower than the bundled DiT (8 blocks of
#: width 96 = 3 heads x 32), epsilon prediction on the linear DDPM schedule, another seed.
UNSEEN_NAME = "dit_unseen"
UNSEEN_DIT_CONFIG = dict(DIT_CONFIG, num_layers=8, num_attention_heads=3)
UNSEEN_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)
#: The cosine DiT (issue 37): a held-out model for the quality target, frozen before the target's
#: rule was designed. Epsilon prediction on the cosine schedule (``squaredcos_cap_v2``), a schedule
#: with a prediction type none of the other bundled models has; 6 blocks of width 96 (3 heads x 32)
#: on 16x16 pixels (the digits upsampled bilinearly, ``mmdit.upsample_digits``) at patch size 2, so
#: 64 tokens as the others but another resolution and patch size.
COSINE_NAME = "dit_cosine"
COSINE_DIT_CONFIG = dict(DIT_CONFIG, sample_size=16, patch_size=2, num_attention_heads=3)
COSINE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=False,
)
#: name -> (model config, scheduler config, training seed) of each class-conditional DiT.
DIT_VARIANTS = {
    DIT_NAME: (DIT_CONFIG, SCHEDULER_CONFIG, 0),
    UNSEEN_NAME: (UNSEEN_DIT_CONFIG, UNSEEN_SCHEDULER_CONFIG, 7),
    COSINE_NAME: (COSINE_DIT_CONFIG, COSINE_SCHEDULER_CONFIG, 11),
}


def build_dit(config: dict | None = None):
    """A fresh (randomly initialised) reference ``DiTTransformer2DModel``."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**(config or DIT_CONFIG))


class DigitClassifier(nn.Module):
    """Small CNN on [B, 1, 8, 8] digits in [-1, 1] -> logits [B, 10].

    ``features(x)`` returns the penultimate activations [B, 128] used by digits-FID.
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _paths(name: str, weights_dir: Path | None) -> tuple[Path, Path]:
    d = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def save_model(module: nn.Module, name: str, record: dict, weights_dir: Path | None = None) -> None:
    """Write ``<name>.safetensors`` and ``<name>.json`` (``record`` plus nothing hidden)."""
    from safetensors.torch import save_file

    st, js = _paths(name, weights_dir)
    st.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(st))
    js.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def load_record(name: str, weights_dir: Path | None = None) -> dict:
    """The JSON record saved beside a bundled model (config, training metrics)."""
    _, js = _paths(name, weights_dir)
    if not js.exists():
        raise FileNotFoundError(f"reference model record {js} is missing; run python -m fastcache_fx.reference.train")
    return json.loads(js.read_text())


def _load_state(module: nn.Module, name: str, weights_dir: Path | None) -> nn.Module:
    from safetensors.torch import load_file

    st, _ = _paths(name, weights_dir)
    module.load_state_dict(load_file(str(st)))
    return module.eval().requires_grad_(False)


def _check_variant(name: str) -> str:
    if name not in DIT_VARIANTS:
        raise ValueError(f"name: expected one of {sorted(DIT_VARIANTS)}, got {name!r}")
    return name


def load(weights_dir: Path | None = None, name: str = DIT_NAME):
    """A bundled class-conditional DiT (eval mode, fp32, CPU), loaded offline from safetensors:
    ``name`` "dit" (the reference DiT) or "dit_unseen" (``UNSEEN_DIT_CONFIG``).

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: the weights are not in the package (not trained yet).
    """
    record = load_record(_check_variant(name), weights_dir)
    return _load_state(build_dit(record["model_config"]), name, weights_dir)


def load_classifier(weights_dir: Path | None = None) -> DigitClassifier:
    """The bundled digit classifier (eval mode); its held-out accuracy is in ``load_record("classifier")``."""
    load_record(CLASSIFIER_NAME, weights_dir)
    return _load_state(DigitClassifier(), CLASSIFIER_NAME, weights_dir)


def scheduler_config(weights_dir: Path | None = None, name: str = DIT_NAME) -> dict:
    """The scheduler config DiT ``name`` was trained with (falls back to its default).

    Raises:
        ValueError: unknown ``name``."""
    try:
        return load_record(_check_variant(name), weights_dir)["scheduler_config"]
    except FileNotFoundError:
        return dict(DIT_VARIANTS[name][1])
