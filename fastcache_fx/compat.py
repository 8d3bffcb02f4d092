"""The one compatibility gate: can a config run on a target? Every entry point asks ``check``.

Targets (``Target``): the graph is a whole transformer or one block graph (regional
compilation), traced with dynamic shapes or not, holds collectives (context parallelism), is
exported, is lowered by TensorRT. ``check`` raises ``ValueError`` naming the option and the
reason for what cannot run, and returns the config to build with (options a target drops, with
a warning, switched off).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from .config import FastCacheConfig
from .config_rules import TOKEN_MERGE_KNOBS, TOKEN_SELECT_KNOBS

#: the options that change the token count across blocks (what one block graph cannot do)
TOKEN_PASSES = (("enable_spatial_approx", "token selection"), ("enable_token_merge", "token merging"))


@dataclass(frozen=True)
class Target:
    """Where a config is to run.

    Attributes:
        block_graph: one graph per block class (regional compilation), not the whole transformer.
        dynamic: the graph was traced with symbolic shapes.
        collectives: the graph holds collectives (context parallelism: each rank a token shard).
        export: ``fastcache_fx.export`` (no Python runtime between calls).
    """

    block_graph: bool = False
    dynamic: bool = False
    collectives: bool = False
    export: bool = False


def check(config: FastCacheConfig, target: Target, *, stacklevel: int = 3) -> FastCacheConfig:
    """The config to build ``target`` with.

    Raises:
        ValueError: an option the target cannot run (the message names it and says why):
            token selection / merging in a block graph or under context parallelism; token
            passes or online calibration in an export; the step and span cache levels in a block
            graph; ``lowering="inductor_split"`` in a block graph, with dynamic shapes or under
            context parallelism. (What depends on the config alone, e.g. a token pass at the step
            level, is refused when the config is built.)
    """
    if config.lowering == "inductor_split":
        _check_split(config, target)
    if config.cache_level != "block":
        _check_level(config, target)
    if target.block_graph:
        for name, what in TOKEN_PASSES:
            if getattr(config, name):
                raise ValueError(f"FastCacheConfig.{name}: not available in regional compilation (one graph per "
                                 f"block class): {what} changes the token count across blocks; compile the whole "
                                 "transformer instead")
    if target.collectives:
        for name, why in (("enable_spatial_approx", "the motion-token count and the token set are per rank"),
                          ("enable_token_merge", "the merge windows would cut across the ranks' shards")):
            if getattr(config, name):
                raise ValueError(f"FastCacheConfig.{name}: not available under context parallelism ({why}); "
                                 "the block cache is")
    if target.export:
        for name, why in (("enable_token_merge", "export does not support the token-merge pass yet"),
                          ("enable_spatial_approx", "export does not support token selection yet (its variants are "
                                                    "chosen per step by the Python runtime)")):
            if getattr(config, name):
                raise ValueError(f"FastCacheConfig.{name}: {why}")
        if config.calibration == "online":
            raise ValueError("FastCacheConfig.calibration: export needs fixed maps (a calibration file), not 'online'")
    if config.lowering == "tensorrt" and target.dynamic:
        warnings.warn("fastcache: lowering='tensorrt' needs static shapes; this dynamic-shape graph is lowered "
                      "by Inductor", stacklevel=stacklevel)
    if target.dynamic:
        for name, what in TOKEN_PASSES:
            if getattr(config, name) and not target.block_graph:
                warnings.warn(f"fastcache: {what} needs static shapes; this dynamic-shape graph keeps the block "
                              f"cache only (pass dynamic=False to torch.compile for {what})", stacklevel=stacklevel)
        config = config.replace(enable_spatial_approx=False, enable_token_merge=False,
                                **dict.fromkeys(TOKEN_SELECT_KNOBS + TOKEN_MERGE_KNOBS))  # their knobs go with them
    return config


def _check_level(config: FastCacheConfig, target: Target) -> None:
    """The step and span levels (``passes.spans``) need the whole stack in one graph (the token
    passes, which they exclude too, are refused when the config is built)."""
    level = config.cache_level
    if target.block_graph:
        raise ValueError(f"FastCacheConfig.cache_level: {level!r} decides once for a run of blocks, which needs the "
                         "whole transformer in one graph; regional compilation compiles one graph per block class "
                         "(use cache_level='block' there, or compile the whole transformer)")


def _check_split(config: FastCacheConfig, target: Target) -> None:
    """``lowering="inductor_split"`` (``lowering/inductor_split.py``) cuts one whole-transformer
    graph of static shapes at its conds."""
    if target.block_graph:
        raise ValueError("FastCacheConfig.lowering: 'inductor_split' cuts the whole step at its decision; regional "
                         "compilation compiles one graph per block class (compile the whole transformer, or use "
                         "lowering='inductor')")
    if target.dynamic:
        raise ValueError("FastCacheConfig.lowering: 'inductor_split' needs static shapes (a CUDA graph replays one "
                         "shape); pass dynamic=False to torch.compile: Dynamo then compiles one piece set per "
                         "input shape")
    if target.collectives:
        raise ValueError("FastCacheConfig.lowering: 'inductor_split' is not available under context parallelism "
                         "(the decision's collectives would sit in a separately captured piece; not checked yet): "
                         "use lowering='inductor'")
