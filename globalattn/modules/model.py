"""The global-token encoder model: embed -> strategy -> encoder -> head.

:class:`GlobalTokenModel` is what :func:`globalattn.modules.build_model` returns
for ``arch='encoder'``. Its submodules (strategy, encoder, head) are passed in
as attributes, so swapping a strategy is swapping one attribute.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.config import ModelConfig
from globalattn.modules.encoder import Encoder
from globalattn.modules.strategies import GlobalStrategy, GlobalTokens
from globalattn.sharding import BATCH, EMBED, LENGTH, VOCAB

Array = jax.Array

__all__ = ["Embedder", "GlobalTokenModel", "check_tokens"]


def check_tokens(tokens: Array, padding_mask: Array, segment_ids: Optional[Array]) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be int [B, T], got {tokens.dtype} {tokens.shape}")
    if padding_mask.shape != tokens.shape or padding_mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask must be bool [B, T] = {tokens.shape}, got {padding_mask.dtype} "
            f"{padding_mask.shape}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids must be [B, T] = {tokens.shape}, got {segment_ids.shape}")


class Embedder(nn.Module):
    """Token + learned absolute position (+ segment) embeddings: ``[B, T] -> [B, T, D]``.

    Segment embeddings are added only when ``segment_ids`` is given and
    ``config.num_segments > 0``; ids outside ``[0, num_segments)`` are clipped by
    the gather (they cannot be checked under jit). Sizes (vocab_size, max_len,
    d_model, num_segments) and dtypes come from ``config``.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None) -> Array:
        c = self.config
        dtype, param_dtype = c.jnp_dtype, c.jnp_param_dtype
        B, T = tokens.shape
        if T > c.max_len:
            raise ValueError(f"sequence length T={T} exceeds max_len={c.max_len}")
        init = nn.initializers.normal(0.02)
        emb = nn.Embed(c.vocab_size, c.d_model, dtype=dtype, param_dtype=param_dtype,
                       name="token",
                       embedding_init=nn.with_logical_partitioning(init, (VOCAB, EMBED)))
        x = emb(tokens)
        pos = self.param("position", nn.with_logical_partitioning(init, (None, EMBED)),
                         (c.max_len, c.d_model), param_dtype)
        x = x + pos[:T].astype(dtype)[None]
        if c.num_segments > 0:
            seg = self.param("segment", nn.with_logical_partitioning(init, (None, EMBED)),
                             (c.num_segments, c.d_model), param_dtype)
            if segment_ids is not None:
                x = x + jnp.take(seg, segment_ids, axis=0, mode="clip").astype(dtype)
        return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))


class GlobalTokenModel(nn.Module):
    """Embeddings, a global-token strategy, an :class:`Encoder` and a head.

    ``__call__(tokens [B, T] int, padding_mask [B, T] bool, segment_ids=None, *,
    num_active_globals=None, deterministic=True)`` returns, by head:
    ``classify`` ``[B, C]``; ``token`` ``[B, T, C]``; ``span``
    ``(start [B, T], end [B, T])``; ``lm`` ``[B, T, V]`` -- always at data
    positions (tokens the strategy prepends are not in the output).

    ``num_active_globals`` (None = all G; a traced int scalar or ``[B]``) is an
    apply-time input, so ``jax.vmap`` over it runs several global counts at once.
    Rng collections: ``params``; ``dropout`` when not deterministic;
    ``random_blocks`` for BigBird's ``'resample'`` policy.
    """

    embedder: Embedder
    strategy: GlobalStrategy
    encoder: Encoder
    head: nn.Module
    dropout_rate: float = 0.0
    drop_global_output: bool = True

    def setup(self):
        self.embed_dropout = nn.Dropout(self.dropout_rate)

    def encode_embeddings(self, x: Array, padding_mask: Array,
                          segment_ids: Optional[Array] = None, *, num_active_globals=None,
                          deterministic: bool = True) -> Tuple[Array, GlobalTokens]:
        """x ``[B, T, D]`` -> (hidden ``[B, P + T, D]``, the strategy's GlobalTokens)."""
        x = self.embed_dropout(x, deterministic=deterministic)
        gt = self.strategy(x, padding_mask, segment_ids, num_active=num_active_globals,
                           deterministic=deterministic)
        glob = gt.global_mask if self.strategy.capacity > 0 else None
        h = self.encoder(gt.x, gt.padding_mask, glob, gt.random_blocks, deterministic)
        return h, gt

    def encode(self, tokens: Array, padding_mask: Array, segment_ids: Optional[Array] = None,
               *, num_active_globals=None, deterministic: bool = True) -> Array:
        """Hidden states ``[B, T, D]``, or ``[B, P + T, D]`` when the strategy keeps
        its prepended tokens (``drop_output=False``)."""
        check_tokens(tokens, padding_mask, segment_ids)
        h, gt = self.encode_embeddings(
            self.embedder(tokens, segment_ids), padding_mask, segment_ids,
            num_active_globals=num_active_globals, deterministic=deterministic)
        return gt.data(h) if self.drop_global_output else h

    def __call__(self, tokens: Array, padding_mask: Array, segment_ids: Optional[Array] = None,
                 *, num_active_globals=None, deterministic: bool = True):
        check_tokens(tokens, padding_mask, segment_ids)
        h, gt = self.encode_embeddings(
            self.embedder(tokens, segment_ids), padding_mask, segment_ids,
            num_active_globals=num_active_globals, deterministic=deterministic)
        return self.head(gt.data(h), padding_mask, gt.gather_globals(h), gt.slot_valid)
