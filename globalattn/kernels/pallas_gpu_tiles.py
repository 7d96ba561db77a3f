"""Tile math shared by the Pallas GPU kernels of global + local attention.

A *tile* is ``[rows, cols]`` logits of a block of query rows against a block
of keys. Every kernel in :mod:`globalattn.kernels.pallas_gpu_local` and
:mod:`globalattn.kernels.pallas_gpu_rows` is a loop over tiles built from the
helpers here: scores in float32 (base-2 logits, so the softmax uses exp2),
the masks of the key sets of the pattern, the online-softmax update of the
forward pass and the gradient of one tile.

Conventions inside the kernels: logits are ``log2(e) / sqrt(H) * q . k``, a
masked logit is ``-inf``; the log-sum-exp ``lse`` of a row is in base 2 and 0
for a row with nothing to attend (its tiles are fully masked, so ``p = 0``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static shape and tiling of one call (hashable: a custom_vjp static arg).

    Sequences are padded from T to Tp (a multiple of every sequence block,
    plus room for the unaligned row loads of the random-block kernel), head dim
    from H to Hp (a power of two >= 16: Triton's dot needs it). Global slots
    are padded from G to Gp (a multiple of ``bg``).
    """

    B: int
    T: int
    N: int
    H: int
    Tp: int
    Hp: int
    left: int
    right: int
    causal: bool
    scale2: float  # log2(e) / sqrt(H)
    bq: int  # forward: query rows per program
    bk: int  # forward: keys per tile
    bqb: int  # backward: query rows per tile
    bkb: int  # backward: keys per tile
    has_sink: bool
    G: int  # 0 = no globals
    Gp: int
    bg: int  # global slots (columns or rows) per tile
    split: int  # sequence blocks per program in the G-sized kernels
    rbs: int  # BigBird block size (0 = no random blocks)
    r: int  # random blocks per query block
    nrt: int  # key tiles per random block
    rt: int  # keys per random tile
    interpret: bool
    num_warps: Optional[int]
    num_stages: Optional[int]

    @property
    def nbr(self) -> int:
        return -(-self.T // self.rbs) if self.rbs else 0

    @property
    def n_random_tiles(self) -> int:
        return self.nbr * self.r * self.nrt


def cdiv(a, b: int):
    """Ceil division of a non-negative (possibly traced) int by a static int."""
    return lax.div(a + (b - 1), b)


def dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False) -> jax.Array:
    """``a @ b`` (``a.T`` / ``b.T`` when ``ta`` / ``tb``) accumulated in float32.

    Float32 inputs ask for full precision: Triton's default for f32 is TF32.
    """
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=(prec, prec),
                           preferred_element_type=jnp.float32)


def in_window(p: Plan, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """[R, C] bool: key position ``cols[c]`` is in the local window of row ``rows[r]``."""
    rel = cols[None, :] - rows[:, None]
    return (rel >= -p.left) & (rel <= p.right)


def global_column_mask(p: Plan, rows: jax.Array, gpos: jax.Array) -> jax.Array:
    """[R, bg]: row attends global key ``gpos`` (-1 = empty slot) outside its window.

    A global key inside the window is counted by the local part; counting it
    here too would weigh it twice.
    """
    ok = (gpos[None, :] >= 0) & (rows[:, None] < p.T) & ~in_window(p, rows, gpos)
    if p.causal:
        ok = ok & (gpos[None, :] <= rows[:, None])
    return ok


def random_mask(p: Plan, rows: jax.Array, rpos: jax.Array, qblock) -> jax.Array:
    """[R, rt]: row attends random key ``rpos`` (-1 = not counted) of query block ``qblock``.

    ``rpos`` already excludes padding, global keys and repeated blocks; here
    the row must belong to BigBird query block ``qblock`` and the key must be
    outside the row's window (the local part counts those).
    """
    ok = ((rpos[None, :] >= 0) & (rows[:, None] < p.T)
          & (lax.div(rows, p.rbs)[:, None] == qblock) & ~in_window(p, rows, rpos))
    if p.causal:
        ok = ok & (rpos[None, :] <= rows[:, None])
    return ok


def scores(p: Plan, q: jax.Array, k: jax.Array) -> jax.Array:
    """[R, C] float32 base-2 logits of rows ``q`` [R, Hp] against keys ``k`` [C, Hp]."""
    return dot(q, k, tb=True) * p.scale2


def online_update(carry, s: jax.Array, v: jax.Array):
    """One flash-attention step: fold masked logits ``s`` [R, C] and values ``v`` [C, Hp] in.

    ``carry = (m, l, acc)``: running row max (``-inf`` while nothing was
    seen), denominator and unnormalised output (float32). The exp shift uses
    0 for rows still at ``-inf`` so no ``inf - inf`` is formed.
    """
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == NEG_INF, 0.0, m_new)
    alpha = jnp.exp2(m - shift)
    pr = jnp.exp2(s - shift[:, None])
    l = l * alpha + jnp.sum(pr, axis=1)
    acc = acc * alpha[:, None] + dot(pr.astype(v.dtype), v)
    return m_new, l, acc


def finish_rows(m, l, acc, sink2: Optional[jax.Array]):
    """Normalise a finished row block; folds in the sink column (value 0).

    Returns ``(out [R, Hp] float32, lse [R] base 2)``; an empty row gives
    ``out = 0`` and ``lse = 0``.
    """
    if sink2 is not None:
        m_new = jnp.maximum(m, sink2)
        shift = jnp.where(m_new == NEG_INF, 0.0, m_new)
        alpha = jnp.exp2(m - shift)
        l = l * alpha + jnp.exp2(sink2 - shift)
        acc = acc * alpha[:, None]
    else:
        shift = jnp.where(m == NEG_INF, 0.0, m)
    ok = l > 0
    out = acc / jnp.where(ok, l, 1.0)[:, None]
    lse = jnp.where(ok, shift + jnp.log2(jnp.where(ok, l, 1.0)), 0.0)
    return out, lse


def tile_grads(s, lse, delta, do, v):
    """Backward of one tile: ``(p, ds)`` from masked logits ``s`` [R, C].

    ``p = softmax probabilities`` (from the saved ``lse``), ``ds = dL/dlogit``
    (natural-log logits, before the 1/sqrt(H) scale): ``p * (do . v - delta)``
    with ``delta = rowsum(out * dout)``.
    """
    pr = jnp.exp2(s - lse[:, None])
    dp = dot(do, v, tb=True)
    return pr, pr * (dp - delta[:, None])


def block_range(start, size: int, before: int, after: int, other: int, limit: int):
    """Blocks of ``other`` positions that a block ``[start, start + size)`` meets.

    Position x meets position y when ``x - before <= y <= x + after``; y is
    clipped to ``[0, limit)``. Returns ``(lo, full_lo, full_hi, hi)`` (traced
    ints): blocks ``[lo, hi)`` meet the block; within ``[full_lo, full_hi)``
    every pair meets (no mask needed); ``lo <= full_lo <= full_hi <= hi``.
    """
    lo = lax.div(jnp.maximum(start - before, 0), other)
    hi = lax.div(jnp.minimum(start + size - 1 + after, limit - 1), other) + 1
    # Block y0 is full when y0*other >= start+size-1-before and
    # y0*other + other - 1 <= start + after.
    f_lo = cdiv(jnp.maximum(start + size - 1 - before, 0), other)
    f_hi = lax.div(jnp.maximum(start + after + 1, 0), other)  # first block that is not
    f_lo = jnp.minimum(jnp.maximum(f_lo, lo), hi)
    f_hi = jnp.maximum(jnp.minimum(f_hi, hi), f_lo)
    return lo, f_lo, f_hi, hi
