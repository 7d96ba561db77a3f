"""Global-token selection: helpers that build a boolean ``global_mask [B, T]``.

Every helper returns a jnp bool array of static shape ``[B, T]`` (B batch,
T sequence length) that can be passed as ``global_mask`` to
:func:`globalattn.global_local_mask` / :func:`globalattn.global_local_attention`.
All of them are jit-friendly: shapes and the small configuration values
(``every``, ``offset``, ``segments``, ``positions``) are static Python values,
the masks themselves may be traced, and nothing syncs with the host.

Padding convention (shared by all helpers):

* ``padding_mask`` is bool ``[B, T]``, True = real token. It may be left
  padded, right padded or arbitrary; "first real token" means the smallest
  position whose ``padding_mask`` is True.
* Helpers that only need the shape accept ``shape=(B, T)`` instead of
  ``padding_mask`` (all tokens real). Pass exactly one of the two, or both
  when they agree.
* The returned mask is always False on padding, so a global flag never lands
  on a padded slot (the attention functions would ignore it anyway; being
  explicit keeps global counts honest for capacity checks).

Bad input raises ValueError naming the offending values.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops import validate as V

Array = jax.Array

__all__ = [
    "cls",
    "first_last",
    "periodic",
    "from_positions",
    "from_segments",
    "from_token_ids",
    "first_last_blocks",
    "keep_first",
    "union",
]


# --------------------------------------------------------------------------
# Argument checks (static: shapes, dtypes and Python values only).
# --------------------------------------------------------------------------
def _check_shape(shape) -> Tuple[int, int]:
    try:
        b, t = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a (B, T) pair of positive ints, got {shape!r}") from None
    return V.check_positive_int(b, "shape[0] (B)"), V.check_positive_int(t, "shape[1] (T)")


def _padding(padding_mask: Optional[Array], shape: Optional[Tuple[int, int]]) -> Array:
    """The ``[B, T]`` bool real-token mask from ``padding_mask`` and/or ``shape``."""
    if padding_mask is None:
        if shape is None:
            raise ValueError("pass padding_mask [B, T] bool or shape=(B, T); got neither")
        return jnp.ones(_check_shape(shape), bool)
    pad = jnp.asarray(padding_mask)
    if pad.dtype != jnp.bool_:
        raise ValueError(f"padding_mask must be boolean, got dtype {pad.dtype}")
    if pad.ndim != 2:
        raise ValueError(f"padding_mask must have shape [B, T], got {pad.shape}")
    if shape is not None and tuple(pad.shape) != _check_shape(shape):
        raise ValueError(f"padding_mask shape {pad.shape} disagrees with shape={tuple(shape)}")
    return pad


def _check_int_array(x, name: str) -> Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [B, T], got {x.shape}")
    return x


def _check_int_set(values, name: str) -> Tuple[int, ...]:
    """A non-empty tuple of static Python ints (a single int is accepted)."""
    if isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be an int or a sequence of ints, got {values!r}") from None
    if not values:
        raise ValueError(f"{name} must be non-empty (an empty set selects no global token; "
                         f"omit the helper instead)")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must contain ints, got {values!r}")
    return tuple(int(v) for v in values)


# --------------------------------------------------------------------------
# Position-based selections.
# --------------------------------------------------------------------------
def cls(padding_mask: Optional[Array] = None, *, shape: Optional[Tuple[int, int]] = None) -> Array:
    """The first real token of each example is global (Longformer's [CLS]).

    Args:
      padding_mask: bool ``[B, T]``, True = real. Left padding is respected:
        the global token is the first True position, not position 0.
      shape: ``(B, T)`` when there is no padding (then position 0 is global).

    Returns:
      bool ``[B, T]`` with exactly one True per example that has a real token,
      and none for an all-padding example.
    """
    pad = _padding(padding_mask, shape)
    # cumsum == 1 is true from the first real token up to (excluding) the
    # second; AND with pad keeps only the first. No argmax, so an all-padding
    # row yields no global instead of a spurious position 0.
    return pad & (jnp.cumsum(pad, axis=-1, dtype=jnp.int32) == 1)


def first_last(padding_mask: Optional[Array] = None, *,
               shape: Optional[Tuple[int, int]] = None) -> Array:
    """The first and the last real token are global ([CLS] ... [SEP]).

    Args:
      padding_mask: bool ``[B, T]``, True = real (left and/or right padding).
      shape: ``(B, T)`` when there is no padding (positions 0 and T - 1).

    Returns:
      bool ``[B, T]``: two Trues per example with >= 2 real tokens, one when
      there is a single real token (first == last), none for all padding.
    """
    pad = _padding(padding_mask, shape)
    c = jnp.cumsum(pad, axis=-1, dtype=jnp.int32)
    total = c[:, -1:]
    return pad & ((c == 1) | (c == total))


def periodic(padding_mask: Optional[Array], every: int, offset: int = 0, *,
             shape: Optional[Tuple[int, int]] = None, from_first_real: bool = False) -> Array:
    """BigBird-style uniform coverage: every ``every``-th real position is global.

    Selects positions ``p = offset, offset + every, offset + 2*every, ...``
    (equivalently ``p >= offset and (p - offset) % every == 0``), real tokens only.

    Args:
      padding_mask: bool ``[B, T]``, True = real; None together with ``shape``.
      every: static positive int, the period.
      offset: static int in ``[0, T)``, the first selected position.
      shape: ``(B, T)`` when there is no padding.
      from_first_real: when True, positions are counted from each example's
        first real token (so left padding does not shift the phase); when
        False (default) they are absolute indices.

    Returns:
      bool ``[B, T]``.
    """
    pad = _padding(padding_mask, shape)
    T = pad.shape[1]
    every = V.check_positive_int(every, "every")
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or not 0 <= offset < T:
        raise ValueError(f"offset must be an int in [0, T={T}), got {offset!r} (every={every})")
    p = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), pad.shape)
    if from_first_real:
        # Number of padded slots before the first real token = position of the
        # first real token (T for all-padding rows; then pad is all False anyway).
        first = jnp.sum(jnp.cumsum(pad, axis=-1, dtype=jnp.int32) == 0, axis=-1, dtype=jnp.int32)
        p = p - first[:, None]
    d = p - offset
    return pad & (d >= 0) & (d % every == 0)


def from_positions(positions: Sequence[int], padding_mask: Optional[Array] = None, *,
                   shape: Optional[Tuple[int, int]] = None) -> Array:
    """Fixed positions are global in every example (duplicates are idempotent).

    Args:
      positions: static ints in ``[0, T)``.
      padding_mask: bool ``[B, T]``; a listed position that is padding is dropped.
      shape: ``(B, T)`` when there is no padding.

    Returns:
      bool ``[B, T]``.
    """
    pad = _padding(padding_mask, shape)
    T = pad.shape[1]
    pos = _check_int_set(positions, "positions")
    bad = [p for p in pos if not 0 <= p < T]
    if bad:
        raise ValueError(f"positions {bad} out of range [0, T={T})")
    row = np.zeros(T, bool)
    row[list(pos)] = True
    return pad & jnp.asarray(row)[None, :]


def first_last_blocks(padding_mask: Array, block_size: int) -> Array:
    """Every token of the block holding the first real token and of the block
    holding the last real token is global (BigBird's ITC globals).

    Args:
      padding_mask: bool ``[B, T]``, True = real.
      block_size: static positive int; block c is positions ``c*bs .. c*bs + bs - 1``.

    Returns:
      bool ``[B, T]``: up to ``2 * block_size`` Trues per example (one block when
      the first and last real token share it), none for all padding.
    """
    pad = _padding(padding_mask, None)
    bs = V.check_positive_int(block_size, "block_size")
    T = pad.shape[1]
    pos = jnp.arange(T)
    first = jnp.argmax(pad, axis=-1)[:, None]  # 0 for an all-padding row (masked below)
    last = jnp.max(jnp.where(pad, pos, -1), axis=-1, keepdims=True)
    blk = pos // bs
    return pad & ((blk == first // bs) | (blk == jnp.maximum(last, 0) // bs))


def keep_first(mask: Array, n: Array) -> Array:
    """Keeps the first ``n`` True entries of each row of ``mask``, in position order.

    This is how a static global capacity G is filled by a traced count: the
    candidates of a selection are ranked by position and only the first ``n``
    stay global.

    Args:
      mask: bool ``[B, T]`` candidates.
      n: int ``[B, 1]`` (or anything broadcasting to it); may be traced.

    Returns:
      bool ``[B, T]``.
    """
    mask = _padding(mask, None)
    n = jnp.asarray(n)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        raise ValueError(f"keep_first: n must be an integer array, got dtype {n.dtype}")
    rank = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1
    return mask & (rank < n)


# --------------------------------------------------------------------------
# Content-based selections.
# --------------------------------------------------------------------------
def _real(padding_mask: Optional[Array], like: Array, like_name: str) -> Array:
    if padding_mask is None:
        return jnp.ones(like.shape, bool)
    pad = _padding(padding_mask, None)
    if pad.shape != like.shape:
        raise ValueError(f"padding_mask shape {pad.shape} disagrees with {like_name} shape {like.shape}")
    return pad


def from_segments(segment_ids: Array, segments: Sequence[int] = (0,),
                  padding_mask: Optional[Array] = None) -> Array:
    """Tokens whose segment id is in ``segments`` are global (e.g. all question tokens).

    Args:
      segment_ids: int ``[B, T]`` (e.g. 0 = question, 1 = context).
      segments: static non-empty set of segment ids to make global.
      padding_mask: optional bool ``[B, T]``; padding is never global.

    Returns:
      bool ``[B, T]``.
    """
    seg = _check_int_array(segment_ids, "segment_ids")
    wanted = _check_int_set(segments, "segments")
    hit = jnp.zeros(seg.shape, bool)
    for s in sorted(set(wanted)):
        hit = hit | (seg == s)
    return hit & _real(padding_mask, seg, "segment_ids")


def from_token_ids(tokens: Array, ids, padding_mask: Optional[Array] = None) -> Array:
    """Every occurrence of any of the token ``ids`` is global (e.g. [SEP], [CLS]).

    Args:
      tokens: int ``[B, T]`` token ids.
      ids: non-empty static ints, or an int array ``[K]`` (may be traced).
      padding_mask: optional bool ``[B, T]``; padding is never global even if
        the pad id is listed.

    Returns:
      bool ``[B, T]``.
    """
    tok = _check_int_array(tokens, "tokens")
    if isinstance(ids, (jax.Array, np.ndarray)):
        ids_arr = jnp.asarray(ids)
        if not jnp.issubdtype(ids_arr.dtype, jnp.integer) or ids_arr.ndim != 1 or ids_arr.shape[0] == 0:
            raise ValueError(f"ids must be a non-empty 1-D integer array, got dtype "
                             f"{ids_arr.dtype} shape {ids_arr.shape}")
    else:
        ids_arr = jnp.asarray(_check_int_set(ids, "ids"), dtype=tok.dtype)
    # [B, T, K] compare is fine: K (special ids) is small.
    hit = jnp.any(tok[:, :, None] == ids_arr.astype(tok.dtype)[None, None, :], axis=-1)
    return hit & _real(padding_mask, tok, "tokens")


# --------------------------------------------------------------------------
# Composition.
# --------------------------------------------------------------------------
def union(*masks: Array) -> Array:
    """OR of global masks; duplicates are idempotent (a token is global or not).

    Args:
      *masks: one or more bool ``[B, T]`` masks; a ``[1, T]`` mask broadcasts
        over the batch.

    Returns:
      bool ``[B, T]``.
    """
    if not masks:
        raise ValueError("union needs at least one mask")
    arrs = [jnp.asarray(m) for m in masks]
    for k, m in enumerate(arrs):
        if m.dtype != jnp.bool_:
            raise ValueError(f"union: mask {k} must be boolean, got dtype {m.dtype}")
        if m.ndim != 2:
            raise ValueError(f"union: mask {k} must have shape [B, T], got {m.shape}")
    T = arrs[0].shape[1]
    B = max(m.shape[0] for m in arrs)
    for k, m in enumerate(arrs):
        if m.shape[1] != T or m.shape[0] not in (1, B):
            raise ValueError(f"union: mask shapes disagree: {[tuple(a.shape) for a in arrs]} "
                             f"(mask {k}); need [B, T] = {(B, T)} or [1, T]")
    out = jnp.zeros((B, T), bool)
    for m in arrs:
        out = out | m
    return out
