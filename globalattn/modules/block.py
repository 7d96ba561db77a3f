"""The pre-LayerNorm transformer block shared by the encoder, the Perceiver and the causal LM.

``x + Drop(Attn(LN(x)))``, then ``x + Drop(MLP(LN(x)))``, ``[B, T, D] -> [B, T, D]``,
configured by one :class:`globalattn.modules.config.BlockConfig`. The
attention sublayer is one of two:

* the module :class:`GlobalLocalSelfAttention` (parameters under ``attn``):
  ``block(x, padding_mask, global_mask, random_blocks, deterministic)``
  (encoder layers, Perceiver latent layers);
* an ``attend`` function: ``block(x, deterministic=d, attend=f, state=s)``
  projects q, k, v in the block itself (parameters ``query``, ``key``,
  ``value``, ``out`` and ``sinks``) and hands them un-rotated to
  ``f(q, k, v, sinks, s) -> (out [B, T, N, H], s')``; it returns ``(x, s')``.
  The causal LM passes the attention of each of its paths (training, the
  streaming oracle, cache decode) this way through the same parameters.

Shapes: B batch, T length, N heads, H head dim, D model dim.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.attention import (GlobalLocalSelfAttention, project_out, project_qkv,
                                          sink_logits)
from globalattn.modules.config import BlockConfig
from globalattn.sharding import BATCH, EMBED, LENGTH
from globalattn.sharding import MLP as MLP_AXIS

Array = jax.Array
# attend(q, k, v, sinks, state) -> (out, state); q, k, v un-rotated [B, T, N, H].
Attend = Callable[[Array, Array, Array, Optional[Array], Any], Any]

__all__ = ["Attend", "MLP", "TransformerBlock", "layer_norm"]


def layer_norm(dtype, param_dtype, name=None) -> nn.LayerNorm:
    """LayerNorm (eps 1e-6) with logically named scale and bias."""
    return nn.LayerNorm(
        epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)))


class MLP(nn.Module):
    """D -> mlp_dim -> D with GELU and dropout on the hidden layer."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        D = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.xavier_uniform(), (EMBED, MLP_AXIS)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (MLP_AXIS,)),
                     name="wi")(x)
        h = nn.with_logical_constraint(nn.gelu(h), (BATCH, LENGTH, MLP_AXIS))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        y = nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.xavier_uniform(), (MLP_AXIS, EMBED)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
                     name="wo")(h)
        return nn.with_logical_constraint(y, (BATCH, LENGTH, EMBED))


class TransformerBlock(nn.Module):
    """The pre-LN block (see the module docstring).

    Attributes:
      config: heads, MLP width, window radius, dropout, dtypes, ... of the layer.
      kind: ``'global_local'`` or ``'full'`` attention (module path only).
    """

    config: BlockConfig
    kind: str = "global_local"

    @nn.compact
    def __call__(self, x: Array, padding_mask: Optional[Array] = None,
                 global_mask: Optional[Array] = None, random_blocks: Optional[Array] = None,
                 deterministic: bool = True, *, attend: Optional[Attend] = None,
                 state: Any = None):
        cfg = self.config
        h = layer_norm(cfg.dtype, cfg.param_dtype, "ln_attn")(x)
        if attend is None:
            if padding_mask is None:
                raise ValueError("TransformerBlock needs padding_mask [B, T] (or an attend "
                                 "function)")
            h = GlobalLocalSelfAttention(cfg, self.kind, name="attn")(
                h, padding_mask, global_mask, random_blocks)
        else:
            q, k, v = (p[1] for p in project_qkv(cfg, h))
            o, state = attend(q, k, v, sink_logits(self, cfg), state)
            h = project_out(cfg, o, x.shape[-1])
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        h = layer_norm(cfg.dtype, cfg.param_dtype, "ln_mlp")(x)
        h = MLP(cfg.mlp_dim, cfg.dropout_rate, cfg.dtype, cfg.param_dtype, name="mlp")(
            h, deterministic)
        x = x + nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
        return x if attend is None else (x, state)
