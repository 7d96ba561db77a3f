"""Rotary position embeddings (RoPE, Su et al. 2021) as pure functions.

Layout: ``x`` is ``[B, T, N, H]`` (or any ``[..., T, N, H]``) with H even.
Convention: the "rotate-half" pairing of GPT-NeoX and Llama: feature ``f`` and
feature ``f + H/2`` form one 2-D pair, rotated at position ``p`` by the angle
``p * base ** (-2 f / H)`` for ``f = 0 .. H/2 - 1``.

The property everything else relies on: rotations compose, so

    <apply_rope(q, a), apply_rope(k, b)> = <apply_rope(q, a - b), k>

depends on the offset ``a - b`` only. That is why a streaming KV cache can store
keys *un-rotated* and rotate them at read time with positions counted inside
the cache (StreamingLLM), and why shifting every position by a constant changes
no attention score.

Rotations are computed in float32 whatever the input dtype; the result has the
input's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["DEFAULT_BASE", "apply_rope", "rope_frequencies"]

DEFAULT_BASE = 10000.0


def rope_frequencies(head_dim: int, base: float = DEFAULT_BASE) -> np.ndarray:
    """Angular frequencies ``base ** (-2 f / H)`` for ``f = 0 .. H/2 - 1``, float32 ``[H/2]``.

    Raises:
      ValueError: ``head_dim`` is not a positive even int, or ``base <= 1``.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) \
            or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"RoPE needs a positive even head_dim, got {head_dim!r}")
    if not base > 1.0:
        raise ValueError(f"RoPE base must be > 1, got {base!r}")
    f = np.arange(head_dim // 2, dtype=np.float64)
    return (base ** (-2.0 * f / head_dim)).astype(np.float32)


def apply_rope(x: Array, positions: Array, *, base: float = DEFAULT_BASE) -> Array:
    """Rotates queries or keys by their positions.

    Args:
      x: ``[..., T, N, H]`` (usually ``[B, T, N, H]``), H even.
      positions: integer (or float) positions broadcastable to ``x.shape[:-2]``,
        e.g. ``[T]``, ``[1, T]`` or ``[B, T]``. They may be any values (the cache
        passes positions counted inside the cache, not in the stream).
      base: the RoPE base (10000 in Llama).

    Returns:
      ``x`` rotated, same shape and dtype.

    Raises:
      ValueError: ``x`` has fewer than 3 dims, an odd head dim, or positions
        that do not broadcast to ``x.shape[:-2]``.
    """
    if x.ndim < 3:
        raise ValueError(f"apply_rope expects x of shape [..., T, N, H], got {x.shape}")
    H = x.shape[-1]
    freqs = jnp.asarray(rope_frequencies(H, base))
    positions = jnp.asarray(positions)
    lead = x.shape[:-2]
    try:
        positions = jnp.broadcast_to(positions, lead)
    except ValueError:
        raise ValueError(f"positions of shape {positions.shape} do not broadcast to "
                         f"x.shape[:-2] = {lead} (x is {x.shape})") from None
    angle = positions.astype(jnp.float32)[..., None, None] * freqs  # [..., T, 1, H/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : H // 2], xf[..., H // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
