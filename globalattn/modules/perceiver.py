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
from globalattn.modules.block import MLP, TransformerBlock, layer_norm
from globalattn.modules.config import BlockConfig, ModelConfig
from globalattn.modules.heads import masked_mean
from globalattn.modules.model import Embedder, check_tokens
from globalattn.modules.strategies import active_count
from globalattn.sharding import EMBED

Array = jax.Array

__all__ = ["CrossAttendBlock", "Perceiver", "PerceiverModel"]


class CrossAttendBlock(nn.Module):
    """queries + Drop(XAttn(LN(queries), LN(inputs))), then + Drop(MLP(LN(.))).

    ``config.num_heads`` are the cross-attention heads; its window and global
    fields do not apply (cross-attention is dense over the valid pairs).
    """

    config: BlockConfig

    @nn.compact
    def __call__(self, queries: Array, inputs: Array, query_mask: Array, key_mask: Array,
                 deterministic: bool = True) -> Array:
        c = self.config
        q = layer_norm(c.dtype, c.param_dtype, "ln_q")(queries)
        kv = layer_norm(c.dtype, c.param_dtype, "ln_kv")(inputs)
        a = CrossAttention(c.num_heads, dtype=c.dtype, param_dtype=c.param_dtype,
                           name="xattn")(q, kv, query_mask, key_mask)
        x = queries + nn.Dropout(c.dropout_rate)(a, deterministic=deterministic)
        h = layer_norm(c.dtype, c.param_dtype, "ln_mlp")(x)
        h = MLP(c.mlp_dim, c.dropout_rate, c.dtype, c.param_dtype, name="mlp")(
            h, deterministic)
        return x + nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)


class Perceiver(nn.Module):
    """Latent encoder and query decoder (see module docstring).

    Attributes:
      config: the model config; ``config.perceiver`` gives the latent array
        (num_latents, num_latent_layers, share_weights, num_cross_heads).
    """

    config: ModelConfig

    @property
    def num_latents(self) -> int:
        return self.config.perceiver.num_latents

    @property
    def param_dtype(self) -> Any:
        return self.config.jnp_param_dtype

    def setup(self):
        c, p = self.config, self.config.perceiver
        dtype, param_dtype = c.jnp_dtype, c.jnp_param_dtype
        self.latents = self.param(
            "latents", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, EMBED)),
            (p.num_latents, c.d_model), param_dtype)
        latent = c.latent_block()
        cross = BlockConfig(num_heads=p.num_cross_heads, mlp_dim=c.mlp_dim,
                            dropout_rate=c.dropout, dtype=dtype, param_dtype=param_dtype)
        self.encoder_xattn = CrossAttendBlock(cross)
        n_blocks = 1 if p.share_weights else p.num_latent_layers
        self.latent_blocks = [TransformerBlock(latent, "full") for _ in range(n_blocks)]
        self.latent_norm = layer_norm(dtype, param_dtype)
        self.decoder_xattn = CrossAttendBlock(cross)
        self.output_norm = layer_norm(dtype, param_dtype)

    def encode(self, x: Array, padding_mask: Array, *, num_active: Any = None,
               deterministic: bool = True) -> Tuple[Array, Array]:
        """x ``[B, S, D]``, padding_mask ``[B, S]`` -> (latents ``[B, M, D]``,
        latent_mask bool ``[B, M]``)."""
        B, S, D = x.shape
        c = self.config
        if D != c.d_model or padding_mask.shape != (B, S):
            raise ValueError(
                f"perceiver inputs must be [B, S, d_model={c.d_model}] with padding_mask "
                f"[B, S]; got {x.shape} and {padding_mask.shape}")
        M = self.num_latents
        latent_mask = jnp.arange(M)[None, :] < active_count(num_active, M, B)
        z = jnp.broadcast_to(self.latents.astype(c.jnp_dtype), (B, M, D))
        z = self.encoder_xattn(z, x, latent_mask, padding_mask, deterministic)
        for i in range(c.perceiver.num_latent_layers):
            block = self.latent_blocks[0 if c.perceiver.share_weights else i]
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
                    nn.initializers.normal(0.02), (None, EMBED)), (1, D),
                    self.perceiver.param_dtype)
                q = jnp.broadcast_to(q.astype(x.dtype), (B, 1, D))
                h = self.perceiver.decode(q, z, zm, None, deterministic)
                return self.head(h, jnp.ones((B, 1), bool))
            pooled = masked_mean(z, zm).astype(x.dtype)[:, None]
            return self.head(pooled, jnp.ones((B, 1), bool))
        h = self.perceiver.decode(x, z, zm, padding_mask, deterministic)
        return self.head(h, padding_mask)
