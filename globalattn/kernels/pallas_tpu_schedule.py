"""Block schedules and per-key codes of the Pallas TPU global + local kernel.

The kernel (:mod:`globalattn.kernels.pallas_tpu_kernels`) attends query blocks
of ``bq`` rows to key blocks of ``bk`` keys along a list per query block:
``ids[..., row, :L]`` with ``count[..., row]`` valid entries. Entries past the
count repeat the last valid id so the pipeline issues no new copy for the
skipped grid steps. Where the lists depend on the data (BigBird random blocks;
causal global blocks) they are built on device (:func:`lists_from_need`) and
scalar-prefetched into SMEM; otherwise (the window band, the global blocks,
the global rows' full lists) they have a closed form (:class:`IntervalLists`)
that the kernels' index maps compute from the grid indices, with no table.

A schedule is only a superset of the blocks that hold an allowed pair: the
kernel recomputes the exact pair mask inside every block from the key codes
below, so visiting one block too many costs time, never correctness. Visiting a
block twice would count its keys twice; the lists are built from a boolean
``need[row, col]`` matrix, so every id appears at most once.

Key codes (one int32 per key slot, :data:`CODE_*`): 0 = invalid (padding or an
empty global slot), 1 = a real non-global token, 2 = a real global token in the
sequence (attended through its global slot, or its window), 3 = a global slot
(the dense block of gathered global keys in front of the sequence).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CODE_INVALID, CODE_TOKEN, CODE_GLOBAL_TOKEN, CODE_GLOBAL_SLOT = 0, 1, 2, 3
# Random-block id that never matches a key's block (out-of-range draws select nothing).
NO_BLOCK = -2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lists_from_need(need: Array, length: int) -> Tuple[Array, Array]:
    """Compact each row of a bool ``[..., R, C]`` matrix into a block list.

    Returns ``(ids [..., R, length] int32, count [..., R] int32)``: the True
    columns of each row in ascending order, then the last of them repeated.
    ``length`` must be >= every row's count (callers pass a proven bound);
    rows with no True column get count 0 and ids 0.
    """
    if length > need.shape[-1]:
        raise ValueError(f"list length {length} exceeds the {need.shape[-1]} columns")
    order = jnp.argsort(~need, axis=-1, stable=True)[..., :length].astype(jnp.int32)
    count = jnp.sum(need, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    ids = jnp.where(jnp.arange(length) < count[..., None], order, last)
    return ids, count


def band_need(nq: int, bq: int, nk: int, bk: int, left: int, right: int, T: int) -> np.ndarray:
    """``[nq, nk]``: key block kb holds a key in the window of some row of query block qb."""
    qb = np.arange(nq)[:, None]
    kb = np.arange(nk)[None, :]
    lo = qb * bq - left
    hi = qb * bq + bq - 1 + right
    return (kb * bk <= hi) & (kb * bk + bk - 1 >= lo) & (kb * bk < T) & (qb * bq < T)


def band_bound(bq: int, bk: int, left: int, right: int) -> int:
    """Most key blocks of size bk that a window band of a bq-row block can touch."""
    return cdiv(bq + left + right, bk) + 1


def _overlap(n_outer: int, b_outer: int, n_inner: int, b_inner: int, T: int) -> np.ndarray:
    """``[n_outer, n_inner]`` float: block o (size b_outer) overlaps block i (size b_inner) below T."""
    o = np.arange(n_outer)[:, None]
    i = np.arange(n_inner)[None, :]
    hit = (i * b_inner <= o * b_outer + b_outer - 1) & (i * b_inner + b_inner - 1 >= o * b_outer)
    return (hit & (i * b_inner < T) & (o * b_outer < T)).astype(np.float32)


def random_ids(random_blocks: Array, T: int, block_size: int) -> Array:
    """``[B', N', nbr, r]`` random block ids with every out-of-range id replaced by NO_BLOCK."""
    nbr = cdiv(T, block_size)
    rb = random_blocks.astype(jnp.int32)
    return jnp.where((rb >= 0) & (rb < nbr), rb, NO_BLOCK)


def random_need(rb: Array, nq: int, bq: int, nk: int, bk: int, T: int, block_size: int) -> Array:
    """``[B', N', nq, nk]``: key block kb holds a key of a random block of some row of qb.

    ``rb`` from :func:`random_ids`. Exact at block granularity: a query-block /
    key-block pair is needed iff a random query block overlapping qb drew a
    random key block overlapping kb.
    """
    nbr = cdiv(T, block_size)
    hit = jnp.any(rb[..., None] == jnp.arange(nbr), axis=-2).astype(jnp.float32)  # [B',N',c,d]
    aq = _overlap(nq, bq, nbr, block_size, T)  # [nq, nbr]
    ak = _overlap(nk, bk, nbr, block_size, T)  # [nk, nbr]
    return jnp.einsum("qc,bncd,kd->bnqk", aq, hit, ak) > 0


def random_bound(bq: int, bk: int, block_size: int, r: int) -> int:
    """Most key blocks the random blocks of one query block can touch."""
    per_q = cdiv(bq - 1, block_size) + 1  # random query blocks overlapping a kernel block
    per_k = cdiv(block_size - 1, bk) + 1  # kernel key blocks overlapping a random block
    return per_q * r * per_k


def causal_need(nq: int, bq: int, nk: int, bk: int) -> np.ndarray:
    """``[nq, nk]``: some key of kb is at or before the last row of qb."""
    return np.arange(nk)[None, :] * bk <= np.arange(nq)[:, None] * bq + bq - 1


def row_random_ids(rb: Array, T: int, Tp: int, block_size: int) -> Array:
    """``[B', N', r, Tp]``: for every query row i its random block ids (row layout for the kernel).

    Rows at or past T get NO_BLOCK.
    """
    rows = jnp.arange(Tp)
    blk = jnp.minimum(rows // block_size, rb.shape[2] - 1)
    per_row = rb[:, :, blk, :]  # [B', N', Tp, r]
    per_row = jnp.where((rows < T)[:, None], per_row, NO_BLOCK)
    return jnp.swapaxes(per_row, -1, -2)


def key_info(pos: Array, code: Array, blk: Optional[Array]) -> Array:
    """``[B, 3, S]`` int32 rows (position, code, random block id) of every key slot."""
    if blk is None:
        blk = jnp.full(pos.shape, -1, jnp.int32)
    return jnp.stack([pos, code, blk], axis=1).astype(jnp.int32)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class IntervalLists:
    """Data-independent block lists in closed form: no table, no scalar prefetch.

    Row ``r`` (of ``n_rows``, blocks of ``row_block`` positions) lists the
    blocks ``0 .. prefix-1``, then ``prefix + lo(r) .. prefix + hi(r)`` with
    ``lo(r) = max(r * row_block + lo_shift, 0) // col_block`` and ``hi(r) =
    min((r * row_block + hi_shift) // col_block, last)``; the interval is
    empty for rows at or past ``seq_len`` (padding) and when ``lo > hi``.
    Entries past the count repeat the last valid id (0 when there is none),
    as :func:`lists_from_need` builds them: the same lists, computed from
    the grid indices by the kernels' index maps. Every schedule without
    globals' causal order or random blocks has this form (:func:`band_lists`,
    :func:`full_lists`).
    """

    n_rows: int
    length: int
    row_block: int
    col_block: int
    lo_shift: int
    hi_shift: int
    last: int
    seq_len: int
    prefix: int = 0

    # Row r and entry j are the kernels' grid indices (traced scalars), or numpy
    # arrays (:meth:`arrays`).
    def _interval(self, r):
        xp = np if isinstance(r, np.ndarray) else jnp
        start = r * self.row_block
        lo = xp.maximum(start + self.lo_shift, 0) // self.col_block
        hi = xp.minimum((start + self.hi_shift) // self.col_block, self.last)
        n = xp.where(start < self.seq_len, xp.maximum(hi - lo + 1, 0), 0)
        return xp, lo, n

    def count(self, r):
        return self.prefix + self._interval(r)[2]

    def ids(self, r, j):
        xp, lo, n = self._interval(r)
        last = xp.where(n > 0, self.prefix + lo + n - 1, max(self.prefix - 1, 0))
        inside = xp.where(j < self.prefix, j, self.prefix + lo + (j - self.prefix))
        return xp.minimum(inside, last)

    def seq_ids(self, r, j):
        """The list with prefix entries replaced by the row's first interval block, minus
        ``prefix`` (the sequence input's blocks; 0 for a row with no interval)."""
        xp, lo, n = self._interval(r)
        return xp.where(n > 0, lo + xp.minimum(xp.maximum(j - self.prefix, 0), n - 1), 0)

    def prefix_ids(self, r, j):
        """The list with interval entries replaced by the last prefix block (the global
        slots' input)."""
        xp = np if isinstance(r, np.ndarray) else jnp
        return xp.minimum(j + 0 * r, max(self.prefix - 1, 0))

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(ids [n_rows, length], count [n_rows])`` as numpy, for tests."""
        r = np.arange(self.n_rows)[:, None]
        j = np.arange(self.length)[None, :]
        return self.ids(r, j).astype(np.int32), self.count(r[:, 0]).astype(np.int32)


def band_lists(nq: int, bq: int, bk: int, left: int, right: int, T: int, length: int,
               prefix: int = 0) -> IntervalLists:
    """The lists of ``[ones(nq, prefix) ; band_need(...)]``: query block -> key blocks."""
    return IntervalLists(nq, length, bq, bk, -left, bq - 1 + right, cdiv(T, bk) - 1, T, prefix)


def band_lists_t(nk: int, bq: int, bk: int, left: int, right: int, T: int,
                 length: int) -> IntervalLists:
    """The lists of ``band_need(...).T``: key block -> query blocks."""
    return IntervalLists(nk, length, bk, bq, -right, bk - 1 + left, cdiv(T, bq) - 1, T)


def full_lists(n_rows: int, row_block: int, n_cols: int, length: int,
               rows_below: Optional[int] = None) -> IntervalLists:
    """Every row lists the columns ``0 .. n_cols-1``; with ``rows_below``, rows
    starting at or past it (``r * row_block >= rows_below``) list nothing."""
    big = 2 ** 30
    return IntervalLists(n_rows, length, row_block, 1, -big, big, n_cols - 1,
                         big if rows_below is None else rows_below)
