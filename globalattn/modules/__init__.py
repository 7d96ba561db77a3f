"""Flax Linen modules: model config, global-token strategies, attention, one block, models.

Modules only project, choose global tokens and call the pure functions of
:mod:`globalattn.ops`. The model contract used by the training loop:

* :func:`default_model_config` -- a locked ConfigDict with every field;
  :class:`ModelConfig` -- the same, frozen and validated once;
* :func:`build_model` -- ``model_cfg -> nn.Module`` whose ``__call__(tokens
  [B, T] int32, padding_mask [B, T] bool, segment_ids=None, *,
  num_active_globals=None, deterministic=True)`` returns classify ``[B, C]``,
  token ``[B, T, C]``, span ``(start [B, T], end [B, T])`` or lm ``[B, T, V]``.

Rng collections: ``'params'``, ``'dropout'``, ``'random_blocks'`` (BigBird).
"""
from globalattn.modules.attention import CrossAttention, GlobalLocalSelfAttention
from globalattn.modules.block import MLP, TransformerBlock
from globalattn.modules.build import build_model
from globalattn.modules.config import (BlockConfig, ModelConfig, PerceiverConfig,
                                       StrategyConfig, Window, default_model_config,
                                       layer_kinds)
from globalattn.modules.encoder import Encoder, EncoderBlock
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
    build_strategy,
)

__all__ = [
    "BigBirdGlobals", "BlockConfig", "ClassifyHead", "ClsGlobal", "CrossAttendBlock",
    "CrossAttention", "Embedder", "Encoder", "EncoderBlock", "ExtraTokens", "FirstGlobals",
    "FirstLastGlobals", "GlobalLocalSelfAttention", "GlobalStrategy", "GlobalTokenModel",
    "GlobalTokens", "LMHead", "MLP", "ModelConfig", "NoGlobals", "Perceiver", "PerceiverConfig",
    "PerceiverModel", "PeriodicGlobals", "STRATEGIES", "SinkTokens", "SpanHead",
    "StrategyConfig", "TaskGlobals", "TokenHead", "TransformerBlock", "Window", "build_model",
    "build_strategy", "default_model_config", "layer_kinds",
]
