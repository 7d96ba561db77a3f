"""Attention modules: project, then call the pure functions of :mod:`globalattn.ops`.

* :class:`GlobalLocalSelfAttention` -- multi-head self-attention over the
  global-local pattern (``kind='global_local'``) or over all valid pairs
  (``kind='full'``, the baseline and Gemma-style full layers), configured by
  one :class:`globalattn.modules.config.BlockConfig`.
* :class:`CrossAttention` -- queries from one sequence, keys/values from
  another (Perceiver encoder and decoder), via :func:`globalattn.dense_attention`.
* :func:`project_qkv`, :func:`project_out`, :func:`sink_logits` -- the pieces
  every self-attention layer shares (also the causal LM's, inside its block).

Shapes: B batch, T query length, S key length, N heads, H head dim, D model
dim. Parameters carry logical axis names (:mod:`globalattn.sharding`);
activations are constrained to ``(BATCH, LENGTH, ...)`` names, which are
no-ops unless the caller installs logical-axis rules and a mesh.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.config import BlockConfig
from globalattn.ops.dense import dense_attention
from globalattn.ops.global_local import global_local_attention
from globalattn.ops.rope import apply_rope
from globalattn.sharding import BATCH, EMBED, HEADS, KV, LENGTH

Array = jax.Array

__all__ = ["GlobalLocalSelfAttention", "CrossAttention", "ATTENTION_KINDS", "project_qkv",
           "project_out", "sink_logits"]

ATTENTION_KINDS = ("global_local", "full")

_KERNEL_INIT = nn.initializers.xavier_uniform()


def _proj_in(name: str, num_heads: int, head_dim: int, dtype, param_dtype,
             kernel_init=_KERNEL_INIT, bias_init=nn.initializers.zeros) -> nn.DenseGeneral:
    """D -> [N, H] projection with logical names (embed, heads, kv)."""
    return nn.DenseGeneral(
        (num_heads, head_dim), axis=-1, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (EMBED, HEADS, KV)),
        bias_init=nn.with_logical_partitioning(bias_init, (HEADS, KV)), name=name)


def _proj_out(features: int, dtype, param_dtype) -> nn.DenseGeneral:
    """[N, H] -> D projection with logical names (heads, kv, embed)."""
    return nn.DenseGeneral(
        features, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, (HEADS, KV, EMBED)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)), name="out")


def _copy_of(value):
    """An initializer returning ``value``: global projections start as the local ones."""
    return lambda *_: nn.unbox(value)


def _constrain_heads(x: Array) -> Array:
    return nn.with_logical_constraint(x, (BATCH, LENGTH, HEADS, KV))


def head_dim_of(config: BlockConfig, d_model: int) -> int:
    """H: ``config.head_dim``, or D // N (ValueError if N does not divide D)."""
    N = config.num_heads
    if config.head_dim is None and d_model % N:
        raise ValueError(f"d_model={d_model} is not divisible by num_heads={N}")
    return config.head_dim if config.head_dim is not None else d_model // N


def project_qkv(config: BlockConfig, x: Array) -> Tuple[nn.Module, ...]:
    """``x [B, T, D]`` -> the three D -> [N, H] projection layers and their outputs.

    Called inside a compact method, so the layers ``query``, ``key``, ``value``
    are parameters of the calling module. Returns
    ``((query_layer, q), (key_layer, k), (value_layer, v))``, each output
    ``[B, T, N, H]`` and not rotated.
    """
    H = head_dim_of(config, x.shape[-1])
    out = []
    for name in ("query", "key", "value"):
        layer = _proj_in(name, config.num_heads, H, config.dtype, config.param_dtype)
        out.append((layer, _constrain_heads(layer(x))))
    return tuple(out)


def project_out(config: BlockConfig, out: Array, features: int) -> Array:
    """``[B, T, N, H]`` -> ``[B, T, D]`` through the ``out`` projection of the caller."""
    y = _proj_out(features, config.dtype, config.param_dtype)(_constrain_heads(out))
    return nn.with_logical_constraint(y, (BATCH, LENGTH, EMBED))


def sink_logits(module: nn.Module, config: BlockConfig) -> Optional[Array]:
    """The sink column's logits ``[N]`` for ``config.sink_logits``: a learned
    parameter ``sinks`` of ``module`` (init 0), fixed zeros, or None."""
    if config.sink_logits == "learned":
        return module.param("sinks", nn.with_logical_partitioning(
            nn.initializers.zeros, (HEADS,)), (config.num_heads,), config.param_dtype)
    if config.sink_logits == "zero":
        return jnp.zeros((config.num_heads,), jnp.float32)
    return None


class GlobalLocalSelfAttention(nn.Module):
    """Multi-head self-attention with global tokens, a local window and options.

    Attributes:
      config: the layer's :class:`BlockConfig` (heads, window radius, causal,
        global capacity, BigBird block size, global projections, sink logits,
        rope, dtypes). ``global_projections`` adds Longformer's separate
        ``query_global``/``key_global``/``value_global`` for global rows,
        initialised as copies of the local ones (only in ``global_local`` layers,
        where global rows exist); ``rope`` rotates queries and keys by their
        position in ``x``, so scores depend on relative positions (H even).
      kind: ``'global_local'`` (the efficient kernel: query i sees keys
        ``i - left .. i + right`` of ``config.window``, plus global and random
        keys) or ``'full'`` (every valid pair, dense; globals and random blocks
        are irrelevant there).
    """

    config: BlockConfig
    kind: str = "global_local"

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array] = None,
                 random_blocks: Optional[Array] = None) -> Array:
        """x ``[B, T, D]``, padding/global masks bool ``[B, T]``, random_blocks
        ``[B or 1, N or 1, nb, r]`` -> ``[B, T, D]``."""
        cfg = self.config
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {self.kind!r} not in {ATTENTION_KINDS}")
        B, T, D = x.shape
        N = cfg.num_heads
        H = head_dim_of(cfg, D)
        if padding_mask.shape != (B, T):
            raise ValueError(f"padding_mask must be [B, T] = {(B, T)}, got {padding_mask.shape}")
        proj = project_qkv(cfg, x)
        q, k, v = (p[1] for p in proj)
        positions = jnp.arange(T)
        rotate = (lambda a: apply_rope(a, positions)) if cfg.rope else (lambda a: a)  # noqa: E731
        q, k = rotate(q), rotate(k)
        sinks = sink_logits(self, cfg)

        if self.kind == "full":
            mask = padding_mask[:, None, :, None] & padding_mask[:, None, None, :]
            if cfg.causal:
                mask = mask & jnp.tril(jnp.ones((T, T), bool))
            out = dense_attention(q, k, v, mask, sinks=sinks)
        else:
            global_qkv = None
            use_globals = global_mask is not None and cfg.max_globals > 0
            if cfg.global_projections and use_globals:
                global_qkv = []
                for (layer, _), name in zip(proj, ("query", "key", "value")):
                    local = layer.variables["params"]
                    glayer = _proj_in(name + "_global", N, H, cfg.dtype, cfg.param_dtype,
                                      kernel_init=_copy_of(local["kernel"]),
                                      bias_init=_copy_of(local["bias"]))
                    global_qkv.append(_constrain_heads(glayer(x)))
                global_qkv = (rotate(global_qkv[0]), rotate(global_qkv[1]), global_qkv[2])
            out = global_local_attention(
                q, k, v, local_window_size=cfg.window,
                global_mask=global_mask if use_globals else None,
                padding_mask=padding_mask, is_causal=cfg.causal,
                max_globals=cfg.max_globals if use_globals else None,
                random_blocks=random_blocks,
                block_size=cfg.block_size if random_blocks is not None else None,
                global_qkv=global_qkv, sinks=sinks)
        return project_out(cfg, out, D)


class CrossAttention(nn.Module):
    """Queries ``[B, T, D]`` attend keys/values ``[B, S, Dk]`` (Perceiver).

    Pair (t, s) is allowed iff ``query_mask[b, t]`` and ``key_mask[b, s]``; a
    masked query row returns 0 (before the output projection's bias).
    """

    num_heads: int
    head_dim: Optional[int] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries: Array, inputs: Array, query_mask: Array,
                 key_mask: Array) -> Array:
        B, T, D = queries.shape
        if inputs.ndim != 3 or inputs.shape[0] != B:
            raise ValueError(f"inputs must be [B={B}, S, D], got {inputs.shape}")
        S = inputs.shape[1]
        if query_mask.shape != (B, T) or key_mask.shape != (B, S):
            raise ValueError(
                f"query_mask must be [B, T] = {(B, T)} and key_mask [B, S] = {(B, S)}, got "
                f"{query_mask.shape} and {key_mask.shape}")
        N = self.num_heads
        if self.head_dim is None and D % N:
            raise ValueError(f"query dim {D} is not divisible by num_heads={N}")
        H = self.head_dim if self.head_dim is not None else D // N
        q = _constrain_heads(_proj_in("query", N, H, self.dtype, self.param_dtype)(queries))
        k = _constrain_heads(_proj_in("key", N, H, self.dtype, self.param_dtype)(inputs))
        v = _constrain_heads(_proj_in("value", N, H, self.dtype, self.param_dtype)(inputs))
        mask = query_mask[:, None, :, None] & key_mask[:, None, None, :]
        out = dense_attention(q, k, v, mask)
        y = _proj_out(D, self.dtype, self.param_dtype)(out)
        return nn.with_logical_constraint(y, (BATCH, LENGTH, EMBED))
