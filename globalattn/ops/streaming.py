"""Streaming generation with a fixed-memory KV cache (StreamingLLM, Xiao et al. 2023).

The cache of one layer has ``S = G + W`` slots: G *sink slots* that keep the
first G tokens of the stream forever, and a ring buffer of the last W tokens.
Memory is O(G + W) whatever the number of generated tokens, every array has a
static shape, and one jitted decode step serves the whole stream (the stream
length is a traced int32 scalar, so nothing recompiles as it grows).

Positional convention ("cache positions", as StreamingLLM does for RoPE).
Keys are cached *un-rotated*; at every step RoPE is applied with positions
counted inside the cache: sink slot g has position g, the ring entries have
positions ``G .. G + n - 1`` from oldest to newest (n of them held), and the
query is the newest entry. For the token at stream index t (0-based, the
model's learned sink tokens included) that is

* query position ``p(t) = min(t, G + W - 1)``;
* a window key j (``t - W < j <= t``, ``j >= G``) sits at offset ``t - j`` --
  its true distance, so local attention is exactly a sliding window;
* sink key g sits at offset ``p(t) - g``: once tokens are evicted the sinks
  look as if they came right before the oldest window token, so no offset ever
  exceeds ``G + W - 1`` (a model trained on length T >= G + W never sees an
  unseen distance).

While nothing has been evicted (``t < G + W``) cache positions are the true
positions, so streaming equals the model's ordinary full forward. Beyond, it
equals :func:`sink_window_attention` applied in every layer: dense causal
attention where query t sees keys ``j < G`` (sinks) and ``t - W < j <= t``
(window), with RoPE in the convention above. That full forward is the
"windowed-with-sinks" oracle the tests compare streamed logits against. It is
dense rather than :func:`globalattn.global_local_attention` because a sink
column needs the query rotated at ``p(t)`` while window columns need it at
t: two queries per row, which the kernel (one query per row) cannot take.
Without sinks (G = 0) the two conventions agree and the kernel's causal
window ``(W - 1, 0)`` is exactly a 0 + W cache.

Model-level helpers (``new_stream``, ``make_decode_step``, ``stream_logits``,
``generate``) live in :mod:`globalattn.modules.decode`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from globalattn.ops import core
from globalattn.ops import validate as V
from globalattn.ops.rope import DEFAULT_BASE, apply_rope

Array = jax.Array

__all__ = [
    "KVCache",
    "cache_attention",
    "cache_layout",
    "init_cache",
    "sink_window_attention",
    "sink_window_mask",
    "streaming_query_positions",
]

_F32 = jnp.float32


def check_cache_shape(num_sink_slots: int, window: int) -> Tuple[int, int]:
    G = V.check_nonneg_int(num_sink_slots, "num_sink_slots")
    # The newest token must fit in the ring: it attends to itself.
    W = V.check_positive_int(window, "window")
    return G, W


# --------------------------------------------------------------------------
# The windowed-with-sinks oracle (full forward, dense).
# --------------------------------------------------------------------------
def sink_window_mask(seq_len: int, *, num_sink_slots: int, window: Optional[int]) -> Array:
    """bool ``[T, T]``: query t may attend key j (causal; sinks ``j < G`` or window ``j > t - W``).

    ``window=None`` is plain causal attention (nothing is ever evicted).
    """
    T = V.check_positive_int(seq_len, "seq_len")
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    causal = j <= i
    if window is None:
        return causal
    G, W = check_cache_shape(num_sink_slots, window)
    return causal & ((j < G) | (j > i - W))


def streaming_query_positions(seq_len: int, *, num_sink_slots: int, window: int) -> Array:
    """int32 ``[T]``: the cache position ``min(t, G + W - 1)`` of the query at stream index t."""
    T = V.check_positive_int(seq_len, "seq_len")
    G, W = check_cache_shape(num_sink_slots, window)
    return jnp.minimum(jnp.arange(T, dtype=jnp.int32), G + W - 1)


def sink_window_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    num_sink_slots: int,
    window: Optional[int],
    base: float = DEFAULT_BASE,
    sinks: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
    return_weights: bool = False,
):
    """Causal attention as a streaming cache of G sinks + W recent tokens computes it.

    O(T^2) dense: the oracle for the cache, and the attention-map probe
    (``window=None``: ordinary causal RoPE attention at true positions).

    Args:
      q, k, v: ``[B, T, N, H]`` *un-rotated* queries / keys (RoPE is applied here:
        true positions for window keys, :func:`streaming_query_positions` for the
        query when it scores a sink key; see the module docstring).
      num_sink_slots: G, the first G positions are kept forever.
      window: W >= 1 recent positions (the query's own included), or None.
      base: RoPE base.
      sinks: optional ``[N]`` per-head sink logits (an extra column with value 0).
      padding_mask: optional bool ``[B, T]`` (True = real token).
      return_weights: also return the attention weights.

    Returns:
      ``out [B, T, N, H]`` (``q.dtype``), and with ``return_weights`` also
      ``weights`` float32 ``[B, N, T, T]`` (rows sum to 1 minus the mass on the
      sink-logit column; rows with nothing to attend are 0).
    """
    B, T, N, H = V.check_qkv(q, k, v)
    if k.shape[1] != T:
        raise ValueError(f"sink_window_attention is self-attention: k length {k.shape[1]} "
                         f"!= q length {T}")
    G = V.check_nonneg_int(num_sink_slots, "num_sink_slots")
    sinks = V.check_sinks(sinks, N)
    mask = sink_window_mask(T, num_sink_slots=G, window=window)[None, None]  # [1, 1, T, T]
    if padding_mask is not None:
        pad = V.check_token_mask(padding_mask, B, T, "padding_mask", default=True)
        mask = mask & (pad[:, None, :, None] & pad[:, None, None, :])
    # Keys no query may attend are zeroed first: NaN written there reaches nothing.
    key_used = jnp.broadcast_to(jnp.any(mask, axis=2)[:, 0], (B, T))
    pos = jnp.arange(T, dtype=jnp.int32)
    qr, kr, vz = core.prepare(apply_rope(q, pos, base=base), apply_rope(k, pos, base=base), v,
                              key_used)  # [B, N, T, H]
    qr, kr, values = qr.astype(_F32), kr.astype(_F32), vz.astype(_F32)[:, :, None]
    if window is not None and G > 0:
        # A sink key is scored by the query rotated at its cache position, the
        # window keys by the query at its true position: two parts, one softmax.
        q_sink = apply_rope(q, streaming_query_positions(T, num_sink_slots=G, window=window),
                            base=base)
        q_sink = jnp.swapaxes(q_sink, 1, 2).astype(_F32)
        parts = [_part(q_sink, kr[:, :, :G], values[..., :G, :], mask[..., :G]),
                 _part(qr, kr[:, :, G:], values[..., G:, :], mask[..., G:])]
    else:
        parts = [_part(qr, kr, values, mask)]
    out, w = core.joint_softmax(parts, T, sinks=sinks, return_weights=True)
    out = jnp.transpose(out, (0, 2, 1, 3)).astype(q.dtype)
    if not return_weights:
        return out
    return out, jnp.concatenate([x[:, :, 0] for x in w], axis=-1)


def _part(q: Array, k: Array, values: Array, mask: Array) -> core.Part:
    """Rows ``q [B, N, T, H]`` against keys ``k [B, N, S, H]`` as one block of a part.

    mask: bool broadcastable to ``[B, N, T, S]``; values ``[B, N, 1, S, H]``.
    """
    mask = mask[:, :, None]  # [B or 1, N or 1, 1, T, S]
    s = jnp.einsum("bnth,bnsh->bnts", q, k)[:, :, None] / math.sqrt(q.shape[-1])
    return core.Part(jnp.where(mask, s, -jnp.inf), mask, values)


# --------------------------------------------------------------------------
# The cache.
# --------------------------------------------------------------------------
@struct.dataclass
class KVCache:
    """Fixed-size KV cache of every layer: G sink slots, then a ring of W slots.

    Attributes:
      keys: ``[L, B, G + W, N, H]`` un-rotated keys (RoPE is applied at read time).
      values: ``[L, B, G + W, N, H]``.
      length: int32 scalar, stream tokens written so far (the stream index of
        the next token); shared by all rows.
      num_sink_slots: static G.
      window: static W >= 1.
    """

    keys: Array
    values: Array
    length: Array
    num_sink_slots: int = struct.field(pytree_node=False, default=0)
    window: int = struct.field(pytree_node=False, default=1)

    @property
    def size(self) -> int:
        """Slots per layer, ``G + W``."""
        return self.num_sink_slots + self.window


def init_cache(num_layers: int, batch_size: int, num_heads: int, head_dim: int, *,
               num_sink_slots: int, window: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache (length 0) of ``num_sink_slots + window`` slots per layer."""
    G, W = check_cache_shape(num_sink_slots, window)
    for name, x in (("num_layers", num_layers), ("batch_size", batch_size),
                    ("num_heads", num_heads), ("head_dim", head_dim)):
        V.check_positive_int(x, name)
    shape = (num_layers, batch_size, G + W, num_heads, head_dim)
    return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   length=jnp.zeros((), jnp.int32), num_sink_slots=G, window=W)


def cache_layout(length: Array, *, num_sink_slots: int, window: int
                 ) -> Tuple[Array, Array, Array, Array]:
    """Where the token at stream index ``length`` is written, and the cache after it.

    Returns:
      ``(write_slot, slot_positions [S], slot_valid [S], query_position)``:
      int32 scalar, int32 ``[S]`` cache positions (see the module docstring),
      bool ``[S]``, int32 scalar; ``S = G + W``.
    """
    G, W = check_cache_shape(num_sink_slots, window)
    t = jnp.asarray(length, jnp.int32)
    slot = jnp.arange(G + W, dtype=jnp.int32)
    is_sink = slot < G
    held = jnp.clip(t - G + 1, 0, W)  # ring entries after the write
    age = jnp.mod(t - slot, W)  # ring slot G + i holds stream index t - age (newest: age 0)
    valid = jnp.where(is_sink, slot <= t, age < held)
    positions = jnp.where(is_sink, slot, G + held - 1 - age)
    write = jnp.where(t < G, t, G + jnp.mod(t - G, W))
    query = jnp.where(t < G, t, G + held - 1)
    return write, positions, valid, query


def cache_attention(q: Array, k: Array, v: Array, keys: Array, values: Array, length: Array, *,
                    num_sink_slots: int, window: int, base: float = DEFAULT_BASE,
                    sinks: Optional[Array] = None) -> Tuple[Array, Array, Array]:
    """One layer, one new token: write its key/value, attend over the cache.

    Args:
      q, k, v: ``[B, N, H]`` un-rotated query, key, value of the new token.
      keys, values: ``[B, S, N, H]`` this layer's cache (``S = G + W``).
      length: int32 scalar, the stream index of the new token.
      num_sink_slots, window: static G and W.
      base: RoPE base.
      sinks: optional ``[N]`` sink logits.

    Returns:
      ``(out [B, N, H], keys, values)`` with the new token written.
    """
    G, W = check_cache_shape(num_sink_slots, window)
    B, S, N, H = keys.shape
    if S != G + W or values.shape != keys.shape:
        raise ValueError(f"cache keys {keys.shape} / values {values.shape} do not have "
                         f"G + W = {G} + {W} slots")
    if q.shape != (B, N, H) or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, N, H] = {(B, N, H)}, got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    sinks = V.check_sinks(sinks, N)
    write, positions, valid, query = cache_layout(length, num_sink_slots=G, window=W)
    keys = jax.lax.dynamic_update_slice_in_dim(keys, k[:, None].astype(keys.dtype), write, 1)
    values = jax.lax.dynamic_update_slice_in_dim(values, v[:, None].astype(values.dtype), write, 1)
    # The whole cache is one block of one part; a new row of a stream always
    # attends itself, so it is never empty.
    keep = jnp.broadcast_to(valid, (B, S))
    qr = jnp.swapaxes(apply_rope(q[:, None], query, base=base), 1, 2)  # [B, N, 1, H]
    kr = apply_rope(keys, positions, base=base)
    _, kr, vz = core.prepare(kr, kr, values, keep)  # [B, N, S, H]
    part = _part(qr.astype(_F32), kr.astype(_F32), vz.astype(_F32)[:, :, None],
                 valid[None, None, None, :])
    out = core.joint_softmax([part], 1, sinks=sinks)[:, :, 0]  # [B, N, H]
    return out.astype(q.dtype), keys, values
