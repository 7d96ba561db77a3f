"""Models by name from a model config: :func:`build_model`.

``build_model(default_model_config())`` gives a working model; an experiment
swaps the global-token strategy by changing ``strategy.name`` alone (every
strategy's parameters have defaults in the same ``strategy`` block). The
config is turned into a validated :class:`globalattn.modules.config.ModelConfig`
once, and that frozen config (or the :class:`BlockConfig` derived from it) is
what every module receives.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from globalattn.modules.config import (ARCHS, DTYPES, ModelConfig, default_model_config)
from globalattn.modules.encoder import Encoder
from globalattn.modules.heads import ClassifyHead, LMHead, SpanHead, TokenHead
from globalattn.modules.lm import CausalLM
from globalattn.modules.model import Embedder, GlobalTokenModel
from globalattn.modules.perceiver import Perceiver, PerceiverModel
from globalattn.modules.strategies import build_strategy

__all__ = ["default_model_config", "build_model", "build_strategy", "ARCHS", "DTYPES"]


def _head(c: ModelConfig) -> nn.Module:
    kw = dict(dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
    if c.head == "classify":
        # PerceiverModel pools before the head (see its docstring).
        return ClassifyHead(c.num_classes, "cls" if c.arch == "perceiver" else c.pooling, **kw)
    if c.head == "token":
        return TokenHead(c.num_classes, **kw)
    if c.head == "span":
        return SpanHead(**kw)
    return LMHead(c.vocab_size, **kw)


def _causal_lm(c: ModelConfig) -> CausalLM:
    """arch='lm': attention_schedule 'full' is full causal attention; 'global_local' a
    causal window of ``window`` keys back (W = window + 1 tokens with the query's own)."""
    model = CausalLM(
        vocab_size=c.vocab_size, d_model=c.d_model, num_heads=c.num_heads,
        num_layers=c.num_layers, mlp_dim=c.mlp_dim,
        window=None if c.attention_schedule == "full" else c.window + 1,
        num_sink_tokens=c.lm.num_sink_tokens, sink_logits=c.lm.sink_logits,
        rope_base=float(c.lm.rope_base), dropout_rate=c.dropout, dtype=c.jnp_dtype,
        param_dtype=c.jnp_param_dtype)
    model._check()  # a bad field fails here, not at the first apply
    return model


def build_model(model_cfg: Any) -> nn.Module:
    """An unbound Linen model from a ModelConfig or a (full or partial) model config.

    Raises ValueError naming the field for any invalid or inconsistent value.
    The model's ``__call__(tokens, padding_mask, segment_ids=None, *,
    num_active_globals=None, deterministic=True)`` returns per ``head``:
    classify ``[B, C]``, token ``[B, T, C]``, span ``(start [B, T], end [B, T])``,
    lm ``[B, T, V]``.
    """
    c = ModelConfig.from_config(model_cfg)
    if c.arch == "lm":
        return _causal_lm(c)
    head = _head(c)
    embedder = Embedder(c)
    if c.arch == "perceiver":
        pooling = c.pooling if c.head == "classify" else "cls"
        return PerceiverModel(embedder, Perceiver(c), head, head_type=c.head, pooling=pooling,
                              dropout_rate=c.dropout)
    strategy = build_strategy(c)
    encoder = Encoder(c, c.block(strategy))
    return GlobalTokenModel(embedder, strategy, encoder, head, dropout_rate=c.dropout,
                            drop_global_output=getattr(strategy, "drop_output", True))
