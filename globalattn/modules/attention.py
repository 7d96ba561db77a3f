"""Attention modules: project, then call the pure functions in globalattn.

* :class:`GlobalLocalSelfAttention` -- multi-head self-attention over the
  global-local pattern (``kind='global_local'``) or over all valid pairs
  (``kind='full'``, the baseline and Gemma-style full layers).
* :class:`CrossAttention` -- queries from one sequence, keys/values from
  another (Perceiver encoder and decoder), via :func:`globalattn.dense_attention`.

Shapes: B batch, T query length, S key length, N heads, H head dim, D model
dim. Parameters carry logical axis names (``embed``, ``heads``, ``kv``);
activations are constrained to ``('batch', 'length', ...)`` names, which are
no-ops unless the caller installs logical-axis rules and a mesh.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.ops.dense import dense_attention
from globalattn.ops.global_local import global_local_attention
from globalattn.ops.rope import apply_rope

Array = jax.Array
Window = Union[int, Tuple[int, int]]

__all__ = ["GlobalLocalSelfAttention", "CrossAttention", "ATTENTION_KINDS"]

ATTENTION_KINDS = ("global_local", "full")

_KERNEL_INIT = nn.initializers.xavier_uniform()


def _proj_in(name: str, num_heads: int, head_dim: int, dtype, param_dtype,
             kernel_init=_KERNEL_INIT, bias_init=nn.initializers.zeros) -> nn.DenseGeneral:
    """D -> [N, H] projection with logical names (embed, heads, kv)."""
    return nn.DenseGeneral(
        (num_heads, head_dim), axis=-1, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, ("embed", "heads", "kv")),
        bias_init=nn.with_logical_partitioning(bias_init, ("heads", "kv")), name=name)


def _proj_out(features: int, dtype, param_dtype) -> nn.DenseGeneral:
    """[N, H] -> D projection with logical names (heads, kv, embed)."""
    return nn.DenseGeneral(
        features, axis=(-2, -1), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="out")


def _copy_of(value):
    """An initializer returning ``value``: global projections start as the local ones."""
    return lambda *_: nn.unbox(value)


def _constrain_heads(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))


class GlobalLocalSelfAttention(nn.Module):
    """Multi-head self-attention with global tokens, a local window and options.

    Attributes:
      num_heads: N.
      head_dim: H (None = D // N).
      window: local window radius w or (left, right); query i sees keys
        ``i - left .. i + right`` (before global and random keys).
      kind: ``'global_local'`` (the efficient kernel) or ``'full'`` (every valid
        pair, dense; globals and random blocks are irrelevant there).
      causal: every pair needs ``j <= i``.
      max_globals: static global capacity G passed to the kernel.
      block_size: BigBird block size (with ``random_blocks`` at call time).
      global_projections: Longformer's separate ``query_global``/``key_global``/
        ``value_global`` for global rows, initialised as copies of the local
        ones (only in ``global_local`` layers, where global rows exist).
      sink_logits: a learned per-head sink logit ``[N]`` (init 0).
      rope: rotate queries and keys by their position in ``x`` (RoPE), so scores
        depend on relative positions; H must be even.
      dtype: computation dtype (softmax is float32 regardless); param_dtype.
    """

    num_heads: int
    head_dim: Optional[int] = None
    window: Window = 0
    kind: str = "global_local"
    rope: bool = False
    causal: bool = False
    max_globals: int = 0
    block_size: Optional[int] = None
    global_projections: bool = False
    sink_logits: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array] = None,
                 random_blocks: Optional[Array] = None) -> Array:
        """x ``[B, T, D]``, padding/global masks bool ``[B, T]``, random_blocks
        ``[B or 1, N or 1, nb, r]`` -> ``[B, T, D]``."""
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {self.kind!r} not in {ATTENTION_KINDS}")
        B, T, D = x.shape
        N = self.num_heads
        if self.head_dim is None and D % N:
            raise ValueError(f"d_model={D} is not divisible by num_heads={N}")
        H = self.head_dim if self.head_dim is not None else D // N
        if padding_mask.shape != (B, T):
            raise ValueError(f"padding_mask must be [B, T] = {(B, T)}, got {padding_mask.shape}")
        proj = {}
        for name in ("query", "key", "value"):
            layer = _proj_in(name, N, H, self.dtype, self.param_dtype)
            proj[name] = (layer, _constrain_heads(layer(x)))
        q, k, v = (proj[n][1] for n in ("query", "key", "value"))
        positions = jnp.arange(T)
        rotate = (lambda a: apply_rope(a, positions)) if self.rope else (lambda a: a)  # noqa: E731
        q, k = rotate(q), rotate(k)

        sinks = None
        if self.sink_logits:
            sinks = self.param("sinks", nn.with_logical_partitioning(
                nn.initializers.zeros, ("heads",)), (N,), self.param_dtype)

        if self.kind == "full":
            mask = padding_mask[:, None, :, None] & padding_mask[:, None, None, :]
            if self.causal:
                mask = mask & jnp.tril(jnp.ones((T, T), bool))
            out = dense_attention(q, k, v, mask, sinks=sinks)
        else:
            global_qkv = None
            use_globals = global_mask is not None and self.max_globals > 0
            if self.global_projections and use_globals:
                global_qkv = []
                for name in ("query", "key", "value"):
                    local = proj[name][0].variables["params"]
                    layer = _proj_in(name + "_global", N, H, self.dtype, self.param_dtype,
                                     kernel_init=_copy_of(local["kernel"]),
                                     bias_init=_copy_of(local["bias"]))
                    global_qkv.append(_constrain_heads(layer(x)))
                global_qkv = (rotate(global_qkv[0]), rotate(global_qkv[1]), global_qkv[2])
            out = global_local_attention(
                q, k, v, local_window_size=self.window,
                global_mask=global_mask if use_globals else None,
                padding_mask=padding_mask, is_causal=self.causal,
                max_globals=self.max_globals if use_globals else None,
                random_blocks=random_blocks,
                block_size=self.block_size if random_blocks is not None else None,
                global_qkv=global_qkv, sinks=sinks)
        out = _constrain_heads(out)
        y = _proj_out(D, self.dtype, self.param_dtype)(out)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


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
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))
