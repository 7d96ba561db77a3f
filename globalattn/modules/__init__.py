"""Flax Linen modules: global-token strategies, attention, encoders, Perceiver, heads.

Modules only project, choose global tokens and call the pure functions of
:mod:`globalattn`. The model contract used by the training loop:

* :func:`default_model_config` -- a locked ConfigDict with every field;
* :func:`build_model` -- ``model_cfg -> nn.Module`` whose ``__call__(tokens
  [B, T] int32, padding_mask [B, T] bool, segment_ids=None, *,
  num_active_globals=None, deterministic=True)`` returns classify ``[B, C]``,
  token ``[B, T, C]``, span ``(start [B, T], end [B, T])`` or lm ``[B, T, V]``.

Rng collections: ``'params'``, ``'dropout'``, ``'random_blocks'`` (BigBird).
"""
from globalattn.modules.attention import CrossAttention, GlobalLocalSelfAttention
from globalattn.modules.build import build_model, build_strategy, default_model_config
from globalattn.modules.encoder import MLP, Encoder, EncoderBlock, layer_kinds
from globalattn.modules.heads import ClassifyHead, LMHead, SpanHead, TokenHead
from globalattn.modules.model import Embedder, GlobalTokenModel
from globalattn.modules.perceiver import CrossAttendBlock, Perceiver, PerceiverModel
from globalattn.modules.strategies import (
    STRATEGIES,
    BigBirdGlobals,
    ClsGlobal,
    ExtraTokens,
    FirstGlobals,
    FirstLastGlobals,
    GlobalStrategy,
    GlobalTokens,
    NoGlobals,
    PeriodicGlobals,
    SinkTokens,
    TaskGlobals,
)

__all__ = [
    "BigBirdGlobals", "ClassifyHead", "ClsGlobal", "CrossAttendBlock", "CrossAttention",
    "Embedder", "Encoder", "EncoderBlock", "ExtraTokens", "FirstGlobals", "FirstLastGlobals",
    "GlobalLocalSelfAttention", "GlobalStrategy", "GlobalTokenModel", "GlobalTokens", "LMHead",
    "MLP", "NoGlobals", "Perceiver", "PerceiverModel", "PeriodicGlobals", "STRATEGIES",
    "SinkTokens", "SpanHead", "TaskGlobals", "TokenHead", "build_model", "build_strategy",
    "default_model_config", "layer_kinds",
]
