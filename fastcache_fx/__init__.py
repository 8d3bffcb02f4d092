"""fastcache-fx: FastCache (arXiv 2505.20353) as a ``torch.compile`` backend for diffusers DiTs.

    transformer = torch.compile(transformer, backend="fastcache", options={...})
    fastcache_fx.stats(transformer); fastcache_fx.reset(transformer)
    pipe = fastcache_fx.enable_fastcache(pipe, config=FastCacheConfig(preset="fast"))
    fastcache_fx.disable_fastcache(pipe)
"""

from ._version import __version__
from . import torch_compat as _torch_compat
from .api import (calibrate, calibrate_target, disable_fastcache, enable_fastcache, reset, set_sampler,
                  set_target_psnr, stats)
from .backend import FastCacheBackend, fastcache_backend
from .config import FastCacheConfig
from .config_groups import (CacheLevelConfig, CalibrationConfig, DecisionConfig, TokenMergeConfig,
                            TokenSelectConfig)
from .presets import PRESETS
from .deploy.load import load_exported
from .deploy.export import export
from .runtime.context import cache_context
from .runtime.replay import replay_decisions
from .runtime.requests import request
from .runtime.span_choice import choose_spans
from .runtime.stats import Stats
from .runtime.traceable import traceable_hooks
from .tune import tune

_torch_compat.warn_if_unsupported()

__all__ = [
    "CacheLevelConfig", "CalibrationConfig", "DecisionConfig", "FastCacheBackend", "FastCacheConfig", "PRESETS", "Stats",
    "TokenMergeConfig", "TokenSelectConfig", "cache_context", "calibrate", "calibrate_target", "choose_spans",
    "disable_fastcache", "enable_fastcache", "export", "fastcache_backend", "load_exported", "replay_decisions",
    "request", "reset", "set_sampler", "set_target_psnr", "stats", "traceable_hooks", "tune", "__version__",
]
