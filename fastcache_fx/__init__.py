"""fastcache-fx: FastCache (arXiv 2505.20353) as a ``torch.compile`` backend for diffusers DiTs.

    transformer = torch.compile(transformer, backend="fastcache", options={...})
    fastcache_fx.stats(transformer); fastcache_fx.reset(transformer)
"""

from ._version import __version__
from . import torch_compat as _torch_compat
from .api import calibrate, enable_fastcache, reset, stats
from .backend import FastCacheBackend, fastcache_backend
from .config import FastCacheConfig
from .deploy.load import load_exported
from .deploy.export import export
from .runtime.context import cache_context
from .runtime.replay import replay_decisions
from .runtime.span_choice import choose_spans
from .runtime.traceable import traceable_hooks
from .tune import tune

_torch_compat.warn_if_unsupported()

__all__ = [
    "FastCacheBackend", "FastCacheConfig", "cache_context", "calibrate", "choose_spans", "enable_fastcache", "export",
    "fastcache_backend", "load_exported", "replay_decisions", "reset", "stats", "traceable_hooks", "tune", "__version__",
]
