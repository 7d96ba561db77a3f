"""Perceiver / Perceiver IO: a learned latent array as the global tokens.

* encode: the M latents cross-attend the inputs ``[B, S, D]`` (padded inputs
  are never attended), then ``num_latent_layers`` latent self-attention blocks
  (one set of weights reused when ``share_weights``);
* decode: output queries ``[B, Q, D]`` cross-attend the latents.

Capacity: M = ``num_latents`` is static; ``num_active`` (None = M; a traced
scalar or ``[B]``) keeps the first latents and masks the rest out of every
row and column, so M = 16 with 4 active computes what M = 4 computes.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.attention import CrossAttention
from globalattn.modules.encoder import MLP, EncoderBlock, layer_norm
from globalattn.modules.heads import masked_mean
from globalattn.modules.model import Embedder, check_tokens
from globalattn.modules.strategies import active_count

Array = jax.Array

__all__ = ["CrossAttendBlock", "Perceiver", "PerceiverModel"]


class CrossAttendBlock(nn.Module):
    """queries + Drop(XAttn(LN(queries), LN(inputs))), then + Drop(MLP(LN(.)))."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: Array, inputs: Array, query_mask: Array, key_mask: Array,
                 deterministic: bool = True) -> Array:
        q = layer_norm(self.dtype, self.param_dtype, "ln_q")(queries)
        kv = layer_norm(self.dtype, self.param_dtype, "ln_kv")(inputs)
        a = CrossAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="xattn")(q, kv, query_mask, key_mask)
        x = queries + nn.Dropout(self.dropout_rate)(a, deterministic=deterministic)
        h = layer_norm(self.dtype, self.param_dtype, "ln_mlp")(x)
        h = MLP(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype, name="mlp")(
            h, deterministic)
        return x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class Perceiver(nn.Module):
    """Latent encoder and query decoder (see module docstring)."""

    num_latents: int
    d_model: int
    num_heads: int
    mlp_dim: int
    num_latent_layers: int = 2
    share_weights: bool = False
    num_cross_heads: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.latents = self.param(
            "latents", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (self.num_latents, self.d_model), self.param_dtype)
        kw = dict(dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder_xattn = CrossAttendBlock(self.num_cross_heads, self.mlp_dim, **kw)
        n_blocks = 1 if self.share_weights else self.num_latent_layers
        self.latent_blocks = [
            EncoderBlock(self.num_heads, self.mlp_dim, kind="full", **kw) for _ in range(n_blocks)]
        self.latent_norm = layer_norm(self.dtype, self.param_dtype)
        self.decoder_xattn = CrossAttendBlock(self.num_cross_heads, self.mlp_dim, **kw)
        self.output_norm = layer_norm(self.dtype, self.param_dtype)

    def encode(self, x: Array, padding_mask: Array, *, num_active: Any = None,
               deterministic: bool = True) -> Tuple[Array, Array]:
        """x ``[B, S, D]``, padding_mask ``[B, S]`` -> (latents ``[B, M, D]``,
        latent_mask bool ``[B, M]``)."""
        B, S, D = x.shape
        if D != self.d_model or padding_mask.shape != (B, S):
            raise ValueError(
                f"perceiver inputs must be [B, S, d_model={self.d_model}] with padding_mask "
                f"[B, S]; got {x.shape} and {padding_mask.shape}")
        M = self.num_latents
        latent_mask = jnp.arange(M)[None, :] < active_count(num_active, M, B)
        z = jnp.broadcast_to(self.latents.astype(self.dtype), (B, M, D))
        z = self.encoder_xattn(z, x, latent_mask, padding_mask, deterministic)
        for i in range(self.num_latent_layers):
            block = self.latent_blocks[0 if self.share_weights else i]
            z = block(z, latent_mask, None, None, deterministic)
        return self.latent_norm(z), latent_mask

    def decode(self, queries: Array, latents: Array, latent_mask: Array,
               query_mask: Optional[Array] = None, deterministic: bool = True) -> Array:
        """queries ``[B, Q, D]`` -> ``[B, Q, D]``."""
        if query_mask is None:
            query_mask = jnp.ones(queries.shape[:2], bool)
        y = self.decoder_xattn(queries, latents, query_mask, latent_mask, deterministic)
        return self.output_norm(y)

    def __call__(self, x, padding_mask, queries, query_mask=None, *, num_active=None,
                 deterministic=True):
        z, zm = self.encode(x, padding_mask, num_active=num_active, deterministic=deterministic)
        return self.decode(queries, z, zm, query_mask, deterministic)


class PerceiverModel(nn.Module):
    """Perceiver IO with the same call contract as :class:`GlobalTokenModel`.

    ``classify``: pooling ``'cls'`` decodes one learned output query;
    ``'mean'``/``'globals'`` average the active latents. ``token``/``span``: the
    embedded inputs are the output queries (one output per input position).
    ``num_active_globals`` is the number of active latents.
    """

    embedder: Embedder
    perceiver: Perceiver
    head: nn.Module
    head_type: str = "classify"
    pooling: str = "cls"
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens: Array, padding_mask: Array, segment_ids: Optional[Array] = None,
                 *, num_active_globals=None, deterministic: bool = True):
        check_tokens(tokens, padding_mask, segment_ids)
        x = self.embedder(tokens, segment_ids)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        z, zm = self.perceiver.encode(x, padding_mask, num_active=num_active_globals,
                                      deterministic=deterministic)
        B, D = x.shape[0], x.shape[-1]
        if self.head_type == "classify":
            if self.pooling == "cls":
                q = self.param("output_query", nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), (None, "embed")), (1, D),
                    self.perceiver.param_dtype)
                q = jnp.broadcast_to(q.astype(x.dtype), (B, 1, D))
                h = self.perceiver.decode(q, z, zm, None, deterministic)
                return self.head(h, jnp.ones((B, 1), bool))
            pooled = masked_mean(z, zm).astype(x.dtype)[:, None]
            return self.head(pooled, jnp.ones((B, 1), bool))
        h = self.perceiver.decode(x, z, zm, padding_mask, deterministic)
        return self.head(h, padding_mask)
