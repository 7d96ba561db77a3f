"""Output heads. All return float32 logits.

Heads read the encoder output at data positions ``h [B, T, D]`` (prepended
strategy tokens already removed), the data padding mask ``[B, T]``, and the
global-slot outputs ``[B, G, D]`` with their validity ``[B, G]``.

* :class:`ClassifyHead` -- ``[B, C]``; pooling ``'cls'`` (the first real data
  token, i.e. the data's [CLS]), ``'globals'`` (mean over the active global
  slots) or ``'mean'`` (mean over real data tokens).
* :class:`TokenHead` -- ``[B, T, C]`` per-position logits (MQAR, tagging).
* :class:`SpanHead` -- extractive QA ``(start [B, T], end [B, T])``; padded
  positions get ``SPAN_MASK_VALUE`` so a softmax over T puts no mass there.
* :class:`LMHead` -- ``[B, T, V]`` next-token logits (with a causal encoder).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.config import HEADS, POOLINGS
from globalattn.sharding import EMBED, VOCAB

Array = jax.Array

__all__ = ["ClassifyHead", "TokenHead", "SpanHead", "LMHead", "HEADS", "POOLINGS",
           "SPAN_MASK_VALUE"]

# Finite (not -inf): a padded row stays NaN-free in log_softmax and its gradient.
SPAN_MASK_VALUE = -1e9


def _dense(features: int, out_axis: str, dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.xavier_uniform(), (EMBED, out_axis)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)))


def masked_mean(h: Array, mask: Array) -> Array:
    """``[B, T, D]``, bool ``[B, T]`` -> ``[B, D]``; 0 where nothing is valid."""
    w = mask.astype(jnp.float32)[..., None]
    s = jnp.sum(jnp.where(mask[..., None], h.astype(jnp.float32), 0.0), axis=1)
    return s / jnp.maximum(jnp.sum(w, axis=1), 1.0)


class ClassifyHead(nn.Module):
    num_classes: int
    pooling: str = "cls"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, padding_mask: Array, h_globals: Optional[Array] = None,
                 globals_valid: Optional[Array] = None) -> Array:
        if self.pooling == "cls":
            first = jnp.argmax(padding_mask, axis=-1)  # the first real token
            pooled = jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0]
        elif self.pooling == "mean":
            pooled = masked_mean(h, padding_mask)
        elif self.pooling == "globals":
            if h_globals is None or h_globals.shape[1] == 0:
                raise ValueError("pooling='globals' needs a strategy with global tokens (G > 0)")
            pooled = masked_mean(h_globals, globals_valid)
        else:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLINGS}")
        logits = _dense(self.num_classes, VOCAB, self.dtype, self.param_dtype, "logits")(
            pooled.astype(h.dtype))
        return logits.astype(jnp.float32)


class TokenHead(nn.Module):
    num_classes: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, padding_mask: Array, h_globals=None, globals_valid=None) -> Array:
        logits = _dense(self.num_classes, VOCAB, self.dtype, self.param_dtype, "logits")(h)
        return logits.astype(jnp.float32)


class SpanHead(nn.Module):
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, padding_mask: Array, h_globals=None,
                 globals_valid=None) -> Tuple[Array, Array]:
        logits = _dense(2, VOCAB, self.dtype, self.param_dtype, "span")(h).astype(jnp.float32)
        logits = jnp.where(padding_mask[..., None], logits, SPAN_MASK_VALUE)
        return logits[..., 0], logits[..., 1]


class LMHead(nn.Module):
    vocab_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array, padding_mask: Array, h_globals=None, globals_valid=None) -> Array:
        logits = _dense(self.vocab_size, VOCAB, self.dtype, self.param_dtype, "logits")(h)
        return logits.astype(jnp.float32)

