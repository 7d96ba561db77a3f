"""The dense oracle and the dense pattern of global + local attention.

Shapes: B batch, T query length, S key length, N heads, H head dim, G global
capacity. Layout ``[B, T, N, H]`` as in ``jax.nn.dot_product_attention``.

* :func:`dense_attention` -- the O(T*S) oracle: masked softmax attention.
* :func:`global_local_mask` -- the dense boolean ``[B, T, T]`` (or
  ``[B, N, T, T]``) pattern of :func:`globalattn.global_local_attention`;
  for tests and analysis only.
* :func:`global_local_reference` -- ``dense_attention`` with that pattern: the
  obviously-correct O(T^2) version every efficient path is tested against.
* :func:`random_block_indices` (BigBird) and :func:`gather_global_positions`
  (the fixed-capacity global buffer).

Masking conventions: masks are booleans (True = may attend), combined once,
and a row with nothing to attend returns exactly 0 with finite gradients.
Logits and softmax are float32 whatever the inputs. This module deliberately
shares no code with the efficient paths (:mod:`globalattn.ops.core`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops import validate as V

Array = jax.Array
Window = Union[int, Tuple[int, int]]

__all__ = [
    "dense_attention",
    "global_local_mask",
    "global_local_reference",
    "random_block_indices",
    "gather_global_positions",
]


# --------------------------------------------------------------------------
# The oracle.
# --------------------------------------------------------------------------
def dense_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Optional[Array] = None,
    *,
    sinks: Optional[Array] = None,
) -> Array:
    """Plain masked softmax attention, O(T*S). The oracle every fast path matches.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, N, H]`` keys.
      v: ``[B, S, N, H]`` values.
      mask: boolean broadcastable to ``[B, N, T, S]``; True = may attend.
      sinks: optional ``[N]`` per-head logit of an extra softmax column whose
        value vector is 0 (softmax-one when the sink logit is 0).

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``. Rows with no allowed key are 0.
      A key that no query may attend is replaced by 0 before use, so NaN/inf
      written there reaches neither outputs nor gradients. A non-finite key or
      value that is attended makes exactly the rows that attend it NaN; a NaN
      sink logit makes every row of its head NaN.
    """
    B, T, N, H = V.check_qkv(q, k, v)
    S = k.shape[1]
    if mask is None:
        mask = jnp.ones((1, 1, 1, 1), bool)
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be boolean, got dtype {mask.dtype}")
    try:
        mask = jnp.broadcast_to(mask, (B, N, T, S))
    except ValueError:
        raise ValueError(
            f"mask of shape {mask.shape} is not broadcastable to [B, N, T, S] = "
            f"{(B, N, T, S)}") from None
    sinks = V.check_sinks(sinks, N)

    f32 = jnp.float32
    key_used = jnp.any(mask, axis=2)  # [B, N, S]
    key_used = jnp.transpose(key_used, (0, 2, 1))[..., None]  # [B, S, N, 1]
    kf = jnp.where(key_used, k.astype(f32), 0.0)
    vf = jnp.where(key_used, v.astype(f32), 0.0)
    # A non-finite key or value makes exactly the rows that attend it NaN:
    # computed with it zeroed (so 0 * NaN reaches no other row), then marked.
    bad = ~(jnp.all(jnp.isfinite(kf), axis=-1) & jnp.all(jnp.isfinite(vf), axis=-1))  # [B, S, N]
    kf = jnp.where(jnp.isfinite(kf), kf, 0.0)
    vf = jnp.where(jnp.isfinite(vf), vf, 0.0)
    attends_bad = jnp.any(mask & jnp.transpose(bad, (0, 2, 1))[:, :, None, :], axis=-1)
    s = jnp.einsum("btnh,bsnh->bnts", q.astype(f32), kf) / math.sqrt(H)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    if sinks is not None:
        m = jnp.maximum(m, sinks[None, :, None])
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
    denom = jnp.sum(p, axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sinks[None, :, None] - m)
    denom = jnp.where(denom == 0, 1.0, denom)  # empty rows give 0; a NaN stays NaN
    out = jnp.einsum("bnts,bsnh->btnh", p / denom[..., None], vf)
    out = jnp.where(jnp.transpose(attends_bad, (0, 2, 1))[..., None], jnp.nan, out)
    return out.astype(q.dtype)


# --------------------------------------------------------------------------
# Random blocks (BigBird).
# --------------------------------------------------------------------------
def random_block_indices(
    rng: Array,
    *,
    seq_len: int,
    block_size: int,
    num_random_blocks: int,
    batch_size: int = 1,
    num_heads: int = 1,
    exclude_window_blocks: int = 0,
    exclude_blocks: Sequence[int] = (),
) -> Array:
    """Draws BigBird random key blocks from a ``jax.random`` key.

    For every (example, head, query block) draws ``num_random_blocks`` distinct
    key blocks uniformly among the ``ceil(seq_len / block_size)`` blocks,
    excluding blocks within ``exclude_window_blocks`` of the query block and the
    blocks listed in ``exclude_blocks`` (BigBird excludes the window and the
    global blocks). When fewer blocks are eligible than requested, the rest are
    drawn from the excluded ones; such picks add no pairs because a pair counts
    once.

    Returns:
      int32 ``[batch_size, num_heads, ceil(seq_len / block_size), r]``.
    """
    V.check_positive_int(seq_len, "seq_len")
    V.check_positive_int(block_size, "block_size")
    V.check_nonneg_int(num_random_blocks, "num_random_blocks")
    nb = -(-seq_len // block_size)
    if num_random_blocks > nb:
        raise ValueError(
            f"num_random_blocks={num_random_blocks} exceeds the number of key blocks "
            f"ceil(seq_len={seq_len} / block_size={block_size}) = {nb}")
    for b in exclude_blocks:
        if not -nb <= b < nb:
            raise ValueError(f"exclude_blocks entry {b} out of range for {nb} blocks")
    qb = np.arange(nb)[:, None]
    kb = np.arange(nb)[None, :]
    excluded = np.abs(qb - kb) <= exclude_window_blocks if exclude_window_blocks >= 0 else np.zeros((nb, nb), bool)
    for b in exclude_blocks:
        excluded[:, b % nb] = True
    u = jax.random.uniform(rng, (batch_size, num_heads, nb, nb))
    # Eligible blocks score in (1, 2), excluded in (0, 1): top_k prefers eligible.
    score = u + jnp.where(jnp.asarray(excluded), 0.0, 1.0)
    _, idx = jax.lax.top_k(score, num_random_blocks)
    return idx.astype(jnp.int32)


# --------------------------------------------------------------------------
# The dense pattern.
# --------------------------------------------------------------------------
def global_local_mask(
    seq_len: int,
    *,
    local_window_size: Window,
    global_mask: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
    is_causal: bool = False,
    random_blocks: Optional[Array] = None,
    block_size: Optional[int] = None,
) -> Array:
    """The dense boolean pattern of :func:`global_local_attention`.

    Pair (i, j) is allowed iff both i and j are real tokens (``padding_mask``),
    ``j <= i`` when causal, and at least one of: ``i - left <= j <= i + right``;
    i is global; j is global; j's block is one of the random blocks of i's block.
    Global flags on padded positions are ignored. A concrete ``random_blocks``
    index outside ``[0, ceil(T / block_size))`` is a ValueError; a traced one
    selects no block.

    Returns:
      bool ``[B, T, T]``, or ``[B, N, T, T]`` when ``random_blocks`` has N > 1
      heads. B is 1 when no per-example argument is given.
    """
    T = V.check_positive_int(seq_len, "seq_len")
    left, right = V.normalize_window(local_window_size)
    B = V.infer_batch(T, global_mask=global_mask, padding_mask=padding_mask,
                      random_blocks=random_blocks)
    pad = V.check_token_mask(padding_mask, B, T, "padding_mask", default=True)
    glob = V.check_token_mask(global_mask, B, T, "global_mask", default=False) & pad
    i = jnp.arange(T)[:, None]
    j = jnp.arange(T)[None, :]
    allowed = (j >= i - left) & (j <= i + right)
    allowed = allowed[None] | glob[:, :, None] | glob[:, None, :]  # [B, T, T]
    valid = pad[:, :, None] & pad[:, None, :]
    if is_causal:
        valid = valid & (j <= i)[None]
    if random_blocks is None:
        if block_size is not None:
            raise ValueError("block_size is only meaningful with random_blocks")
        return allowed & valid
    rb = V.check_random_blocks(random_blocks, block_size, B, None, T)
    bs = block_size
    nb = -(-T // bs)
    # hit[b, n, qblock, kblock] = kblock is among the random blocks of qblock.
    hit = jnp.any(rb[..., None] == jnp.arange(nb), axis=-2)
    qblk = jnp.arange(T) // bs
    rand = hit[:, :, qblk][:, :, :, qblk]  # [B', N', T, T]
    full = allowed[:, None] | rand
    full = full & valid[:, None]
    if full.shape[1] == 1:
        return full[:, 0]
    return full


def global_local_reference(
    q: Array,
    k: Array,
    v: Array,
    *,
    local_window_size: Window,
    global_mask: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
    is_causal: bool = False,
    random_blocks: Optional[Array] = None,
    block_size: Optional[int] = None,
    global_qkv: Optional[Tuple[Array, Array, Array]] = None,
    sinks: Optional[Array] = None,
) -> Array:
    """Obviously-correct O(T^2) version of :func:`global_local_attention`.

    ``dense_attention`` with the dense pattern; with ``global_qkv``, global rows
    are taken from ``dense_attention(q_g, k_g, v_g, mask)``.
    """
    T = q.shape[1]
    mask = global_local_mask(
        T, local_window_size=local_window_size, global_mask=global_mask,
        padding_mask=padding_mask, is_causal=is_causal,
        random_blocks=random_blocks, block_size=block_size)
    mask = mask[:, None] if mask.ndim == 3 else mask
    out = dense_attention(q, k, v, mask, sinks=sinks)
    if global_qkv is None or global_mask is None:
        return out
    qg, kg, vg = global_qkv
    out_g = dense_attention(qg, kg, vg, mask, sinks=sinks)
    glob = jnp.asarray(global_mask, bool)
    if padding_mask is not None:
        glob = glob & jnp.asarray(padding_mask, bool)
    glob = jnp.broadcast_to(glob, q.shape[:2])
    return jnp.where(glob[:, :, None, None], out_g, out)


# --------------------------------------------------------------------------
# Fixed-capacity global buffer.
# --------------------------------------------------------------------------
def gather_global_positions(global_mask: Array, max_globals: int) -> Tuple[Array, Array, Array]:
    """Positions of the global tokens in a fixed ``[B, G]`` buffer.

    Args:
      global_mask: bool ``[B, T]``.
      max_globals: static capacity G.

    Returns:
      ``(positions [B, G] int32, valid [B, G] bool, count [B] int32)``. Slots past
      an example's count hold position 0 and ``valid=False``. When ``count > G``
      the first G globals (in position order) fill the buffer; callers must treat
      ``count > G`` as an error (see :func:`global_local_attention`).
    """
    B, T = global_mask.shape
    G = max_globals
    count = jnp.sum(global_mask, axis=-1, dtype=jnp.int32)
    rank = jnp.cumsum(global_mask, axis=-1, dtype=jnp.int32) - 1
    slot = jnp.where(global_mask & (rank < G), rank, G)  # G = dropped
    pos = jnp.zeros((B, G), jnp.int32)
    bidx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    pos = pos.at[bidx, slot].set(
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)), mode="drop")
    valid = jnp.arange(G)[None, :] < count[:, None]
    return pos, valid, count
