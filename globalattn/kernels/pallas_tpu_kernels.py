"""Block-sparse flash attention in Pallas TPU (Mosaic): forward, dq and dk/dv kernels.

One differentiable primitive, :func:`attend`, runs both passes of the global +
local kernel (see :mod:`globalattn.kernels.pallas_tpu`) with one custom VJP:

* rows pass: every query block against its scheduled key blocks of
  ``[global slots ; sequence]``; the pair mask is window, global columns
  (outside the window) and random blocks (not global, not in the window);
* full-rows pass (``full_rows=True``): gathered global query rows against every
  real key of the sequence.

Rows that live in G slots (the global rows' outputs and dq, the key slots' dK /
dV) are folded into a block of the sequence inside the kernels: a one-hot
``[block, slots]`` matmul over the two slot blocks that can hold the block's
slots (:func:`_fold_rows`), scalar-prefetched per block.

Layout (``Config.heads_first``): heads-first ``[B, N, T, H]`` blocks of one
head, or token-major ``[B, T, N * H]`` (a free reshape of the caller's
``[B, T, N, H]``) with a block of ``bq`` rows holding ``heads`` heads
(:func:`heads_per_block`: lane-dense, 128 lanes on TPU, e.g. two heads of 64);
each head's products are matmuls of blocks with the other heads' lanes
zeroed. Head groups share one block schedule (the union of their heads'
needs). Softmax is online in float32 with the row max and denominator of each
head in VMEM scratch; the only per-row residuals written to HBM are the
log-sum-exp and, in the backward, ``do . out`` (``[B, N / heads, heads,
Tq]``, computed by a kernel of its own). Sinks start the running softmax at
``(m, l) = (sink, 1)``: an extra column of value 0. The backward recomputes
probabilities from the log-sum-exp: ``dq`` walks the forward schedule,
``dk``/``dv`` walk the transposed one (key block -> query blocks), in groups so
that global slots (seen by every query block) and sequence keys (seen by a
band) get lists of their own length.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from globalattn.kernels import pallas_tpu_schedule as S

Array = jax.Array

_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


class Config(NamedTuple):
    """Static description of one pass (hashable: a custom_vjp non-diff argument)."""

    bq: int
    bk: int
    left: int
    right: int
    causal: bool
    full_rows: bool  # rows see every real key (global rows); qinfo row 0 is the row position
    n_rand: int  # random ids per row in qinfo (rows pass), 0 = none
    row_code: bool  # rows pass: qinfo row 0 is nonzero for rows that attend nothing here
    sched_bn: Tuple[int, int]  # leading (B', N') of the schedules: 1 = shared, N' = head groups
    info_bn: Tuple[int, int]  # leading (B', N') of qinfo: N' = 1 or head groups
    info_heads: int  # heads whose rows one qinfo block holds (1: shared by the group's heads)
    has_sinks: bool
    n_global_blocks: int  # key blocks [0, ng) are the global slots (inputs kg, vg), the rest K
    heads: int  # heads per block: a block is [rows, heads * head_dim] of the token-major array
    head_dim: int
    heads_first: bool  # arrays are [B, N, T, H] (then heads == 1), else token-major [B, T, N * H]
    non_finite_rule: bool  # apply core.non_finite_to_keys to the key blocks here (else the caller did)
    interpret: Any  # False on TPU; True or pltpu.InterpretParams elsewhere


def heads_per_block(n_heads: int, head_dim: int, lanes: int) -> int:
    """The fewest heads whose lanes fill whole ``lanes``-wide tiles, or all of them.

    A block of the token-major ``[B, T, N * H]`` arrays is ``heads * H`` lanes
    wide: a multiple of the lane tile (128 on TPU) or the whole last dimension.
    """
    for d in range(1, n_heads + 1):
        if n_heads % d == 0 and (d * head_dim) % lanes == 0:
            return d
    return n_heads


def _out(shape, dtype, like: Array) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the same manual (shard_map) axes as ``like``."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).mat)


def _sel(idx: Any, n: int) -> Any:
    return idx if n > 1 else 0


def _flat(cfg_bn, b, n, rows, row, width, col):
    """Flat index into a ``[B', N', rows, width]`` SMEM table."""
    bsel, nsel = _sel(b, cfg_bn[0]), _sel(n, cfg_bn[1])
    return ((bsel * cfg_bn[1] + nsel) * rows + row) * width + col


def _allowed(cfg: Config, qpos, kpos, kcode, kblk, qrand, qglob=None):
    """The exact pair mask; all arguments broadcast to one 2-D block."""
    valid = kcode != S.CODE_INVALID
    if qglob is not None:  # padding, or a global row (its attention is the global-rows pass's)
        valid = valid & (qglob == 0)
    if cfg.full_rows:
        ok = valid
    else:
        rel = kpos - qpos
        in_win = (rel >= -cfg.left) & (rel <= cfg.right)
        seq_ok = in_win
        if qrand:
            hit = qrand[0] == kblk
            for t in qrand[1:]:
                hit = hit | (t == kblk)
            seq_ok = seq_ok | (hit & (kcode != S.CODE_GLOBAL_TOKEN))
        # Boolean algebra rather than a select of booleans (Mosaic cannot relayout i1 selects).
        gslot = kcode == S.CODE_GLOBAL_SLOT
        ok = valid & ((gslot & jnp.logical_not(in_win)) | (jnp.logical_not(gslot) & seq_ok))
    if cfg.causal:
        ok = ok & (kpos <= qpos)
    return ok


def _row_info(cfg: Config, qinfo_ref, i, shape, rows_axis: int, h: int = 0):
    """Row positions, random ids (of the group's head ``h``) and row codes, oriented
    along ``rows_axis`` of a 2-D block."""
    bq = cfg.bq

    def orient(x):  # a row of bq values from the qinfo block -> broadcastable vector
        return jnp.expand_dims(x, -1) if rows_axis == 0 else x[None, :]

    if cfg.full_rows:
        return orient(qinfo_ref[0]), [], None
    qpos = i * bq + lax.broadcasted_iota(jnp.int32, shape, rows_axis)
    per = (1 if cfg.row_code else 0) + cfg.n_rand  # qinfo rows per head
    first = (h if cfg.info_heads > 1 else 0) * per + (1 if cfg.row_code else 0)
    qrand = [orient(qinfo_ref[first + t]) for t in range(cfg.n_rand)]
    return qpos, qrand, orient(qinfo_ref[0]) if cfg.row_code else None


def _key_info(kinfo_ref, keys_axis: int):
    def orient(x):
        return x[None, :] if keys_axis == 1 else jnp.expand_dims(x, -1)
    return orient(kinfo_ref[0]), orient(kinfo_ref[1]), orient(kinfo_ref[2])


def _zero_rows(x: Array, flag_col: Array, keep_value: int, equal: bool) -> Array:
    """``x [R, W]`` with rows zeroed where ``flag_col [R, 1]`` (int32) is (``equal``) or
    is not ``keep_value``. Masked slots may hold NaN / inf that a zero probability
    would still spread through a matmul (``0 * nan``)."""
    flag = jnp.broadcast_to(flag_col, x.shape)
    keep = (flag == keep_value) if equal else (flag != keep_value)
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _lanes_of(cfg: Config, shape, h: int) -> Array:
    """Bool ``shape``: the lanes of the group's head ``h``."""
    return lax.broadcasted_iota(jnp.int32, shape, 1) // cfg.head_dim == h


def _head(cfg: Config, x: Array, h: int) -> Array:
    """``x [R, heads * H]`` with every lane but head ``h``'s zeroed. A contraction over
    the lanes of two such blocks is head ``h``'s alone: both operands are masked, as
    another head's NaN or inf times a zero would still be NaN."""
    if cfg.heads == 1:
        return x
    return jnp.where(_lanes_of(cfg, x.shape, h), x, jnp.zeros((), x.dtype))


def _put(cfg: Config, acc: Array, new: Array, h: int) -> Array:
    """``new`` in head ``h``'s lanes of ``acc``, ``acc`` elsewhere."""
    if cfg.heads == 1:
        return new
    return jnp.where(_lanes_of(cfg, acc.shape, h), new, acc)


def _non_finite_rule(cfg: Config, k: Array, v: Array):
    """The library's rule for non-finite keys (``core.non_finite_to_keys``) on a
    key block ``k, v [R, heads * H]``, per head: a token with a non-finite key
    or value entry gets an all-NaN key (every score against it is NaN), and a
    value's non-finite entries become 0 (no ``0 * inf`` of a zero probability).

    Returns ``(k', v', bad, v_ok)``: ``bad [R, heads * H]`` marks every lane of
    such a (token, head), ``v_ok`` the finite value entries; the backward
    zeroes dK at ``bad`` and dV outside ``v_ok`` (the rule's own derivative).
    Applied inside the kernels, it costs no copy of ``k`` and ``v``.
    """
    if not cfg.non_finite_rule:  # the caller applied it to k and v
        return k, v, None, None
    v32 = v.astype(jnp.float32)  # (Mosaic tests finiteness in float32 only)
    v_ok = jnp.isfinite(v32)
    nonfinite = jnp.where(jnp.isfinite(k.astype(jnp.float32)) & v_ok, 0.0, 1.0)
    if cfg.heads == 1:
        flag = jnp.broadcast_to(jnp.max(nonfinite, axis=1, keepdims=True), k.shape)
    else:
        flag = jnp.zeros(k.shape, jnp.float32)
        for h in range(cfg.heads):
            lanes = _lanes_of(cfg, k.shape, h)
            per = jnp.max(jnp.where(lanes, nonfinite, 0.0), axis=1, keepdims=True)
            flag = jnp.where(lanes, jnp.broadcast_to(per, k.shape), flag)
    bad = flag > 0
    return (jnp.where(bad, jnp.full((), jnp.nan, k.dtype), k),
            jnp.where(v_ok, v, jnp.zeros((), v.dtype)), bad, v_ok)


def _split(cfg: Config, refs, n_fixed: int, with_sinks: bool = False, with_globals=False):
    refs = list(refs)
    fixed, rest = refs[:n_fixed], refs[n_fixed:]
    if with_globals and cfg.n_global_blocks:
        fixed += [rest.pop(0), rest.pop(0)]
    qinfo = rest.pop(0) if (cfg.full_rows or cfg.n_rand or cfg.row_code) else None
    sinks = rest.pop(0) if (with_sinks and cfg.has_sinks) else None
    return fixed, qinfo, sinks, rest


def _pack(*lists) -> Array:
    """Int32 lists one after another in one flat scalar-prefetch table: one operand per call."""
    return jnp.concatenate([jnp.reshape(x, (-1,)).astype(jnp.int32) for x in lists])


class _Lists:
    """One call's block lists: ``ids[row, j]`` (the j-th block row ``row`` visits) and
    ``count[row]``; for a forward pass also the per-input lists of :func:`split_lists`.

    From arrays ``(ids [B', N', R, L], count [B', N', R])`` they are packed into one
    scalar-prefetch table (:func:`_pack`) read through the prefetch refs ``pre``;
    from :class:`pallas_tpu_schedule.IntervalLists` (``count`` None) they are
    computed from the indices, with no operand at all.
    """

    def __init__(self, cfg: Config, ids, cnt, split: bool):
        self.closed = ids if isinstance(ids, S.IntervalLists) else None
        self.sb = cfg.sched_bn
        if self.closed is not None:
            self.n_rows, self.length = self.closed.n_rows, self.closed.length
            self.operands = []
            return
        self.n_rows, self.length = ids.shape[-2], ids.shape[-1]
        extra = split_lists(ids, cfg.n_global_blocks) if split else ()
        self.operands = [_pack(ids, cnt, *extra)]
        n_ids = ids.size
        self._at = (0, n_ids, n_ids + cnt.size, 2 * n_ids + cnt.size)

    def _read(self, pre, which: int, b, n, r, j):
        return pre[0][self._at[which] + _flat(self.sb, b, n, self.n_rows, r, self.length, j)]

    def ids(self, pre, b, n, r, j):
        if self.closed is not None:
            return self.closed.ids(r, j)
        return self._read(pre, 0, b, n, r, j)

    def count(self, pre, b, n, r):
        if self.closed is not None:
            return self.closed.count(r)
        return pre[0][self._at[1] + _flat(self.sb, b, n, 1, 0, self.n_rows, r)]

    def seq_ids(self, pre, b, n, r, j):
        if self.closed is not None:
            return self.closed.seq_ids(r, j)
        return self._read(pre, 2, b, n, r, j)

    def prefix_ids(self, pre, b, n, r, j):
        if self.closed is not None:
            return self.closed.prefix_ids(r, j)
        return self._read(pre, 3, b, n, r, j)


def _dispatch(cfg, lists: _Lists, pre, b, n, i, j, step, seq_refs, glob_refs):
    """Runs ``step`` on the global-slot or the sequence block that list entry j names."""
    live = j < lists.count(pre, b, n, i)
    if not cfg.n_global_blocks:
        pl.when(live)(lambda: step(*seq_refs))
        return
    is_glob = lists.ids(pre, b, n, i, j) < cfg.n_global_blocks
    pl.when(live & is_glob)(lambda: step(*glob_refs))
    pl.when(live & jnp.logical_not(is_glob))(lambda: step(*seq_refs))


def _width(cfg: Config) -> int:
    return cfg.heads * cfg.head_dim


def _spec(cfg: Config, rows: int, index) -> pl.BlockSpec:
    """The BlockSpec of ``rows`` rows of one head group; ``index(*grid, *prefetch)``
    returns ``(example, row block, head group)``."""
    if cfg.heads_first:
        def heads_index(*a):
            b, r, n = index(*a)
            return (b, n, r, 0)
        return pl.BlockSpec((None, None, rows, cfg.head_dim), heads_index)
    return pl.BlockSpec((None, rows, _width(cfg)), index)


def _groups(cfg: Config, x: Array) -> int:
    return x.shape[1] if cfg.heads_first else x.shape[-1] // _width(cfg)


def _length(cfg: Config, x: Array) -> int:
    return x.shape[2] if cfg.heads_first else x.shape[1]


def _kv_specs(cfg: Config, lists: _Lists):
    """BlockSpecs of (K, V) and, with globals, (K_glob, V_glob) along the forward lists.

    The sequence inputs follow ``kseq`` (the list with global entries replaced
    by the row's first sequence block) and the global inputs ``kglob`` (sequence
    entries replaced by the last global block), so neither refetches a block
    while the other one is in use.
    """
    def seq_map(b, n, i, j, *pre):
        return (b, lists.seq_ids(pre, b, n, i, j), n)

    def glob_map(b, n, i, j, *pre):
        return (b, lists.prefix_ids(pre, b, n, i, j), n)

    seq = [_spec(cfg, cfg.bk, seq_map)] * 2
    glob = [_spec(cfg, cfg.bk, glob_map)] * 2 if cfg.n_global_blocks else []
    return seq, glob


def split_lists(ids: Array, n_global_blocks: int) -> Tuple[Array, Array]:
    """Per-input block lists from a forward list over ``[global slots ; sequence]`` blocks."""
    ng = n_global_blocks
    is_seq = ids >= ng
    first_seq = jnp.min(jnp.where(is_seq, ids, jnp.iinfo(jnp.int32).max), axis=-1, keepdims=True)
    first_seq = jnp.where(first_seq == jnp.iinfo(jnp.int32).max, ng, first_seq)
    kseq = jnp.where(is_seq, ids, first_seq) - ng
    last_glob = jnp.max(jnp.where(is_seq, -1, ids), axis=-1, keepdims=True)
    kglob = jnp.where(is_seq, jnp.maximum(last_glob, 0), ids)
    return kseq.astype(jnp.int32), kglob.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Folding per-slot rows (global rows' outputs, the slots' gradients) into blocks.
# ---------------------------------------------------------------------------
class SlotTable(NamedTuple):
    """Where G slots sit in the sequence, for gathering them and folding rows back.

    ``fold_pos [B, 1, Gs]``: each slot's position, -1 for an empty slot;
    ``slot_block [B, nb]``: for each block of the sequence (of the kernel's
    block size), the slot block (of ``block`` slots) holding its first slot.
    Positions ascend with the slot and a sequence block holds at most
    ``block`` slots (or all slots fit one block), so its slots lie in that
    slot block and the next.
    """

    fold_pos: Array
    slot_block: Array


class Fold(NamedTuple):
    """Per-slot rows ``values`` (each token-major ``[B, Gs, N * H]``) to add at the slots'
    positions."""

    table: SlotTable
    values: Tuple[Array, ...]
    block: int


def _fold_prefetch(fold: Optional[Fold]):
    return [] if fold is None else [fold.table.slot_block.reshape(-1).astype(jnp.int32)]


def _fold_specs(cfg: Config, fold: Optional[Fold], n_seq_blocks: int):
    """BlockSpecs and operands of a fold: two slot blocks of positions, then of each value.

    Index maps take ``(b, n, r, j, *prefetch)`` with the fold's table last among the prefetch.
    """
    if fold is None:
        return [], []
    fb = fold.block
    nb = fold.table.fold_pos.shape[-1] // fb

    def blk(b, r, t, sblk_ref):
        return jnp.minimum(sblk_ref[b * n_seq_blocks + r] + t, nb - 1)

    specs, args = [], []
    for t in range(2):
        specs.append(pl.BlockSpec(
            (None, 1, fb), lambda b, n, r, j, *pre, t=t: (b, 0, blk(b, r, t, pre[-1]))))
        args.append(fold.table.fold_pos)
    for x in fold.values:
        for t in range(2):
            specs.append(_spec(
                cfg, fb, lambda b, n, r, j, *pre, t=t: (b, blk(b, r, t, pre[-1]), n)))
            args.append(x)
    return specs, args


def _fold_rows(pos_col, sblk, n_slot_blocks: int, refs, n_values: int):
    """``[onehot(pos_col == slot position) @ value for each value]`` in float32.

    ``pos_col [R, 1]`` (or broadcastable to ``[R, fb]``): the positions of the
    block's rows; ``refs``: the fold's 2 position refs then 2 refs per value.
    A row takes its slot's value exactly, NaN and +-inf included, and no other
    slot's: the matmul sees only finite values (``0 * nan`` would spread one
    slot's NaN to every row), and a second one carries each element's kind
    (1 NaN, 2 +inf, 4 -inf: small integers, exact in any float dtype).
    """
    out = [0.0] * n_values
    kind = [0.0] * n_values
    for t in range(2):
        # The second slot block is clamped to the last one: when it does not
        # exist, shift its positions out of reach instead of counting twice.
        shift = 0 if t == 0 else jnp.where(sblk + 1 < n_slot_blocks, 0, -(2 ** 30))
        hit = pos_col == refs[t][...] + shift
        for a in range(n_values):
            g = refs[2 + 2 * a + t][...]
            g32 = g.astype(jnp.float32)  # (Mosaic tests finiteness in float32 only)
            finite = jnp.isfinite(g32)
            code = jnp.where(jnp.isnan(g32), 1.0,
                             jnp.where(finite, 0.0, jnp.where(g32 > 0, 2.0, 4.0)))
            # One 1 per row: exact in one bf16 pass; float32 needs the full precision.
            exact = lax.Precision.HIGHEST if g.dtype == jnp.float32 else lax.Precision.DEFAULT
            h = hit.astype(g.dtype)
            out[a] = out[a] + lax.dot_general(h, jnp.where(finite, g32, 0.0).astype(g.dtype),
                                              _NN, preferred_element_type=jnp.float32,
                                              precision=exact)
            kind[a] = kind[a] + lax.dot_general(h, code.astype(g.dtype), _NN,
                                                preferred_element_type=jnp.float32)
    inf = jnp.float32(jnp.inf)
    return [jnp.where(c == 1.0, jnp.float32(jnp.nan),
                      jnp.where(c == 2.0, inf, jnp.where(c == 4.0, -inf, o)))
            for o, c in zip(out, kind)]


def _fold_query_block(cfg: Config, b, i, nq: int, sblk_ref, n_fold: int, refs):
    """The one folded value at the rows of query block ``i`` (forward and dq kernels)."""
    rows = i * cfg.bq + lax.broadcasted_iota(jnp.int32, (cfg.bq, 1), 0)
    return _fold_rows(rows, sblk_ref[b * nq + i], n_fold, refs, 1)[0]


def _n_fold_blocks(fold: Optional[Fold]) -> int:
    return 0 if fold is None else fold.table.fold_pos.shape[-1] // fold.block


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------
def _fwd_kernel(*refs, cfg: Config, lists: _Lists, scale: float, n_fold: int):
    pre, refs = refs[:len(lists.operands)], refs[len(lists.operands):]
    nq, L = lists.n_rows, lists.length
    sblk_ref, refs = (refs[0], refs[1:]) if n_fold else (None, refs)
    fixed, qinfo_ref, sinks_ref, rest = _split(cfg, refs, 4, with_sinks=True, with_globals=True)
    q_ref, k_ref, v_ref, kinfo_ref = fixed[:4]
    fold_refs, rest = rest[:4 if n_fold else 0], rest[4 if n_fold else 0:]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    b, n, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        for h in range(cfg.heads):
            if cfg.has_sinks:
                m_ref[h] = jnp.full(m_ref.shape[1:], sinks_ref[n * cfg.heads + h], jnp.float32)
                l_ref[h] = jnp.ones(l_ref.shape[1:], jnp.float32)
            else:
                m_ref[h] = jnp.full(m_ref.shape[1:], -jnp.inf, jnp.float32)
                l_ref[h] = jnp.zeros(l_ref.shape[1:], jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(k_ref, v_ref):
        q = q_ref[...]
        k, v, _, _ = _non_finite_rule(cfg, k_ref[...], v_ref[...])
        kpos, kcode, kblk = _key_info(kinfo_ref, 1)
        v = _zero_rows(v, _key_info(kinfo_ref, 0)[1], S.CODE_INVALID, equal=False)
        acc = acc_ref[...]
        for h in range(cfg.heads):
            s = lax.dot_general(_head(cfg, q, h), _head(cfg, k, h), _NT,
                                preferred_element_type=jnp.float32) * scale
            qpos, qrand, qcode = _row_info(cfg, qinfo_ref, i, s.shape, 0, h)
            s = jnp.where(_allowed(cfg, qpos, kpos, kcode, kblk, qrand, qcode), s, -jnp.inf)
            m_prev = m_ref[h][:, :1]
            l_prev = l_ref[h][:, :1]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            # An empty row so far keeps m = -inf: shift by 0 so exp gives exact zeros.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe)
            l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p.astype(v.dtype), v, _NN, preferred_element_type=jnp.float32)
            acc = _put(cfg, acc, alpha * acc + pv, h)
            m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
            l_ref[h] = jnp.broadcast_to(l_new, l_ref.shape[1:])
        acc_ref[...] = acc

    _dispatch(cfg, lists, pre, b, n, i, j, step, (k_ref, v_ref), fixed[4:])

    @pl.when(j == L - 1)
    def _finish():
        o = acc_ref[...]
        for h in range(cfg.heads):
            l = l_ref[h][:, :1]
            has = l > 0
            o = _put(cfg, o, o / jnp.where(has, l, 1.0), h)
            # +inf for an empty row: its probabilities exp(s - lse) are 0 in the backward.
            lse = jnp.where(has, m_ref[h] + jnp.log(jnp.where(has, l_ref[h], 1.0)), jnp.inf)
            lse_ref[pl.ds(h, 1), :] = jnp.transpose(lse)[:1, :]  # column -> lane-dense row
        if n_fold:  # the global rows' outputs, written over rows that attended nothing here
            o = o + _fold_query_block(cfg, b, i, nq, sblk_ref, n_fold, fold_refs)
        o_ref[...] = o.astype(o_ref.dtype)


def _common_specs(cfg: Config, qinfo, sinks, q_block_of):
    """BlockSpecs of the optional qinfo and sinks inputs."""
    specs, args = [], []
    if qinfo is not None:
        ib, inn = cfg.info_bn
        rows = qinfo.shape[2]

        def qinfo_map(*idx):
            b, n, qb = q_block_of(*idx)
            return (_sel(b, ib), _sel(n, inn), 0, qb)
        specs.append(pl.BlockSpec((None, None, rows, cfg.bq), qinfo_map))
        args.append(qinfo)
    if sinks is not None:
        specs.append(pl.BlockSpec(memory_space=pltpu.MemorySpace.SMEM))
        args.append(sinks)
    return specs, args


def _forward(cfg: Config, q, k, v, kg, vg, sinks, kinfo, qinfo, ids, cnt,
             fold: Optional[Fold] = None):
    """Output (``q``'s layout) and log-sum-exp ``[B, N / heads, heads, Tq]`` of one pass;
    ``fold`` (the global rows' outputs) is added at its rows, which attend nothing here."""
    B, Tq = q.shape[0], _length(cfg, q)
    bq, bk, W, hb = cfg.bq, cfg.bk, _width(cfg), cfg.heads
    Ng = _groups(cfg, q)
    lists = _Lists(cfg, ids, cnt, split=True)
    nq, L = lists.n_rows, lists.length
    scale = 1.0 / math.sqrt(cfg.head_dim)

    def kinfo_map(b, n, i, j, *pre):
        return (b, 0, lists.ids(pre, b, n, i, j))

    def qmap(b, n, i, j, *_):
        return (b, i, n)

    extra_specs, extra = _common_specs(cfg, qinfo, sinks if cfg.has_sinks else None,
                                       lambda b, n, i, j, *_: (b, n, i))
    seq_specs, glob_specs = _kv_specs(cfg, lists)
    fold_specs, fold_args = _fold_specs(cfg, fold, nq)
    in_specs = ([_spec(cfg, bq, qmap)] + seq_specs
                + [pl.BlockSpec((None, 3, bk), kinfo_map)] + glob_specs + extra_specs
                + fold_specs)
    glob_args = [kg, vg] if cfg.n_global_blocks else []
    out_specs = [_spec(cfg, bq, qmap),
                 pl.BlockSpec((None, None, hb, bq), lambda b, n, i, j, *_: (b, n, 0, i))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(lists.operands) + (fold is not None), grid=(B, Ng, nq, L),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((hb, bq, _LANES), jnp.float32),
                        pltpu.VMEM((hb, bq, _LANES), jnp.float32),
                        pltpu.VMEM((bq, W), jnp.float32)])
    kernel = functools.partial(_fwd_kernel, cfg=cfg, lists=lists, scale=scale,
                               n_fold=_n_fold_blocks(fold))
    isz = q.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * B * Ng * hb * nq * L * bq * bk * cfg.head_dim,
                           transcendentals=B * Ng * hb * nq * L * bq * bk,
                           bytes_accessed=isz * B * Ng * (2 * Tq * W + 2 * nq * L * bk * W))
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[_out(q.shape, q.dtype, q), _out((B, Ng, hb, Tq), jnp.float32, q)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=cfg.interpret, name="global_local_fwd",
    )(*lists.operands, *_fold_prefetch(fold), q, k, v, kinfo, *glob_args, *extra,
      *fold_args)
    return out, lse


# ---------------------------------------------------------------------------
# Backward: the rows' do . out, then dq along the forward schedule.
# ---------------------------------------------------------------------------
def _row_dots_kernel(*refs, cfg: Config):
    o_ref, do_ref, qinfo_ref, di_ref = (refs[0], refs[1], refs[2] if cfg.row_code else None,
                                        refs[-1])
    i = pl.program_id(2)
    prod = do_ref[...].astype(jnp.float32) * o_ref[...].astype(jnp.float32)
    for h in range(cfg.heads):
        d = jnp.sum(_head(cfg, prod, h), axis=1, keepdims=True)  # [bq, 1]
        if cfg.row_code:  # rows that attend nothing here: their output is not this pass's
            code = _row_info(cfg, qinfo_ref, i, (cfg.bq, 1), 0)[2]
            d = jnp.where(code != 0, 0.0, d)
        # column -> lane-dense row
        di_ref[pl.ds(h, 1), :] = jnp.transpose(jnp.broadcast_to(d, (cfg.bq, _LANES)))[:1, :]


def _row_dots(cfg: Config, out: Array, do: Array, qinfo) -> Array:
    """``do . out`` per row and head, ``[B, N / heads, heads, Tq]`` float32, zero at rows
    with a nonzero row code: one read of ``out`` and ``do`` (XLA would materialize the
    float32 product and a transposed copy of it)."""
    B, Tq = out.shape[0], _length(cfg, out)
    Ng, hb, bq = _groups(cfg, out), cfg.heads, cfg.bq
    nq = Tq // bq

    def qmap(b, n, i):
        return (b, i, n)
    in_specs = [_spec(cfg, bq, qmap), _spec(cfg, bq, qmap)]
    args = [out, do]
    if cfg.row_code:
        extra_specs, extra = _common_specs(cfg, qinfo, None, lambda b, n, i: (b, n, i))
        in_specs += extra_specs
        args += extra
    return pl.pallas_call(
        functools.partial(_row_dots_kernel, cfg=cfg), grid=(B, Ng, nq), in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, hb, bq), lambda b, n, i: (b, n, 0, i)),
        out_shape=_out((B, Ng, hb, Tq), jnp.float32, out),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
        cost_estimate=pl.CostEstimate(flops=2 * B * Tq * Ng * _width(cfg), transcendentals=0,
                                      bytes_accessed=out.dtype.itemsize * 2 * B * Tq * Ng
                                      * _width(cfg) + 4 * B * Ng * hb * Tq),
        interpret=cfg.interpret, name="global_local_row_dots",
    )(*args)


def _dq_kernel(*refs, cfg: Config, lists: _Lists, scale: float, n_fold: int):
    pre, refs = refs[:len(lists.operands)], refs[len(lists.operands):]
    nq, L = lists.n_rows, lists.length
    sblk_ref, refs = (refs[0], refs[1:]) if n_fold else (None, refs)
    fixed, qinfo_ref, _, rest = _split(cfg, refs, 7, with_globals=True)
    q_ref, k_ref, v_ref, kinfo_ref, lse_ref, di_in_ref, do_ref = fixed[:7]
    fold_refs, rest = rest[:4 if n_fold else 0], rest[4 if n_fold else 0:]
    dq_ref, acc_ref, di_ref = rest
    b, n, i, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        for h in range(cfg.heads):  # lane-dense row -> column (rows on sublanes)
            di_ref[h] = jnp.transpose(jnp.broadcast_to(di_in_ref[pl.ds(h, 1), :],
                                                       (_LANES, cfg.bq)))

    def step(k_ref, v_ref):
        q, do = q_ref[...], do_ref[...]
        kpos, kcode, kblk = _key_info(kinfo_ref, 1)
        kcode_col = _key_info(kinfo_ref, 0)[1]
        k, v, _, _ = _non_finite_rule(cfg, k_ref[...], v_ref[...])
        k = _zero_rows(k, kcode_col, S.CODE_INVALID, equal=False)
        v = _zero_rows(v, kcode_col, S.CODE_INVALID, equal=False)
        acc = acc_ref[...]
        for h in range(cfg.heads):
            s = lax.dot_general(_head(cfg, q, h), _head(cfg, k, h), _NT,
                                preferred_element_type=jnp.float32) * scale
            qpos, qrand, qcode = _row_info(cfg, qinfo_ref, i, s.shape, 0, h)
            s = jnp.where(_allowed(cfg, qpos, kpos, kcode, kblk, qrand, qcode), s, -jnp.inf)
            p = jnp.exp(s - jnp.expand_dims(lse_ref[h], -1))
            dp = lax.dot_general(_head(cfg, do, h), _head(cfg, v, h), _NT,
                                 preferred_element_type=jnp.float32)
            ds = p * (dp - di_ref[h][:, :1])
            dqh = lax.dot_general(ds.astype(k.dtype), k, _NN, preferred_element_type=jnp.float32)
            acc = _put(cfg, acc, acc + dqh, h)
        acc_ref[...] = acc

    _dispatch(cfg, lists, pre, b, n, i, j, step, (k_ref, v_ref), fixed[7:])

    @pl.when(j == L - 1)
    def _finish():
        dq = acc_ref[...] * scale
        if n_fold:  # the global rows' dq, at rows that attended nothing here
            dq = dq + _fold_query_block(cfg, b, i, nq, sblk_ref, n_fold, fold_refs)
        dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward_dq(cfg: Config, q, k, v, kg, vg, kinfo, qinfo, ids, cnt, lse, di, do,
                 fold: Optional[Fold] = None):
    """dQ (``q``'s layout) of one pass, given its rows' ``do . out`` (:func:`_row_dots`).

    Heads-first, dQ is written over ``do``'s buffer (an input-output alias; this
    is the last use of ``do`` in the backward, and XLA copies ``do`` first where
    it is still live): no buffer of dQ's own. Token-major it is not (measured:
    XLA then copied ``do``, 0.2 GB more at T = 131072)."""
    B, Tq = q.shape[0], _length(cfg, q)
    bq, bk, W, hb = cfg.bq, cfg.bk, _width(cfg), cfg.heads
    Ng = _groups(cfg, q)
    lists = _Lists(cfg, ids, cnt, split=True)
    nq, L = lists.n_rows, lists.length

    def kinfo_map(b, n, i, j, *pre):
        return (b, 0, lists.ids(pre, b, n, i, j))

    def qmap(b, n, i, j, *_):
        return (b, i, n)

    def rowmap(b, n, i, j, *_):
        return (b, n, 0, i)

    extra_specs, extra = _common_specs(cfg, qinfo, None, lambda b, n, i, j, *_: (b, n, i))
    seq_specs, glob_specs = _kv_specs(cfg, lists)
    fold_specs, fold_args = _fold_specs(cfg, fold, nq)
    in_specs = ([_spec(cfg, bq, qmap)] + seq_specs
                + [pl.BlockSpec((None, 3, bk), kinfo_map),
                   pl.BlockSpec((None, None, hb, bq), rowmap),
                   pl.BlockSpec((None, None, hb, bq), rowmap),
                   _spec(cfg, bq, qmap)] + glob_specs + extra_specs
                + fold_specs)
    glob_args = [kg, vg] if cfg.n_global_blocks else []
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(lists.operands) + (fold is not None), grid=(B, Ng, nq, L),
        in_specs=in_specs,
        out_specs=_spec(cfg, bq, qmap),
        scratch_shapes=[pltpu.VMEM((bq, W), jnp.float32),
                        pltpu.VMEM((hb, bq, _LANES), jnp.float32)])
    kernel = functools.partial(_dq_kernel, cfg=cfg, lists=lists,
                               scale=1.0 / math.sqrt(cfg.head_dim), n_fold=_n_fold_blocks(fold))
    isz = q.dtype.itemsize
    cost = pl.CostEstimate(flops=6 * B * Ng * hb * nq * L * bq * bk * cfg.head_dim,
                           transcendentals=B * Ng * hb * nq * L * bq * bk,
                           bytes_accessed=isz * B * Ng * (3 * Tq * W + 2 * nq * L * bk * W))
    prefetch = [*lists.operands, *_fold_prefetch(fold)]
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=_out(q.shape, q.dtype, q),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=cfg.interpret, name="global_local_dq",
        input_output_aliases={len(prefetch) + 6: 0} if cfg.heads_first else {},  # do -> dq
    )(*prefetch, q, k, v, kinfo, lse, di, do, *glob_args, *extra, *fold_args)


# ---------------------------------------------------------------------------
# Backward: dk, dv along the transposed schedule, one call per key group.
# ---------------------------------------------------------------------------
def _dkv_kernel(*refs, cfg: Config, lists: _Lists, scale: float, n_fold_blocks: int,
                add: bool):
    pre = refs[:len(lists.operands)]
    n_prefetch = len(pre) + (1 if n_fold_blocks else 0)
    sblk_ref = refs[len(pre)] if n_fold_blocks else None
    Lt = lists.length
    (q_ref, k_ref, v_ref, kinfo_ref, lse_ref, di_ref, do_ref), qinfo_ref, _, rest = _split(
        cfg, refs[n_prefetch:], 7)
    fold_refs, rest = rest[:6 if n_fold_blocks else 0], rest[6 if n_fold_blocks else 0:]
    add_refs, rest = rest[:2 if add else 0], rest[2 if add else 0:]
    dk_ref, dv_ref, dk_acc, dv_acc = rest
    b, n, kb, j = (pl.program_id(a) for a in range(4))

    @pl.when(j == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(j < lists.count(pre, b, n, kb))
    def _step():
        i = lists.ids(pre, b, n, kb, j)  # the query block
        q, do = q_ref[...], do_ref[...]
        k, v, _, _ = _non_finite_rule(cfg, k_ref[...], v_ref[...])
        kpos, kcode, kblk = _key_info(kinfo_ref, 0)
        v = _zero_rows(v, kcode, S.CODE_INVALID, equal=False)
        if cfg.row_code:  # rows that attend nothing here may hold anything
            q = _zero_rows(q, _row_info(cfg, qinfo_ref, i, (cfg.bq, 1), 0)[2], 0, equal=True)
        dk, dv = dk_acc[...], dv_acc[...]
        for h in range(cfg.heads):
            st = lax.dot_general(_head(cfg, k, h), _head(cfg, q, h), _NT,
                                 preferred_element_type=jnp.float32) * scale  # [bk, bq]
            qpos, qrand, qcode = _row_info(cfg, qinfo_ref, i, st.shape, 1, h)
            st = jnp.where(_allowed(cfg, qpos, kpos, kcode, kblk, qrand, qcode), st, -jnp.inf)
            pt = jnp.exp(st - lse_ref[pl.ds(h, 1), :])
            dvh = lax.dot_general(pt.astype(do.dtype), do, _NN,
                                  preferred_element_type=jnp.float32)
            dpt = lax.dot_general(_head(cfg, v, h), _head(cfg, do, h), _NT,
                                  preferred_element_type=jnp.float32)
            dst = pt * (dpt - di_ref[pl.ds(h, 1), :])
            dkh = lax.dot_general(dst.astype(q.dtype), q, _NN,
                                  preferred_element_type=jnp.float32)
            dv = _put(cfg, dv, dv + dvh, h)
            dk = _put(cfg, dk, dk + dkh, h)
        dk_acc[...] = dk
        dv_acc[...] = dv

    @pl.when(j == Lt - 1)
    def _finish():
        # The rule's derivative: no gradient reaches a NaN-keyed token's key or a
        # value entry that was replaced by 0 (the folded and added parts come
        # from the same tokens' blocks, masked alike by their own kernels).
        dk = dk_acc[...] * scale
        dv = dv_acc[...]
        if cfg.non_finite_rule:
            _, _, bad, v_ok = _non_finite_rule(cfg, k_ref[...], v_ref[...])
            dk = jnp.where(bad, 0.0, dk)
            dv = jnp.where(v_ok, dv, 0.0)
        if n_fold_blocks:  # the global slots' dK / dV at their positions
            kpos = jnp.expand_dims(kinfo_ref[0], -1)  # [bk, 1]
            add_k, add_v = _fold_rows(kpos, sblk_ref[b * lists.n_rows + kb], n_fold_blocks,
                                      fold_refs, 2)
            dk, dv = dk + add_k, dv + add_v
        if add:  # another pass's dK / dV of these keys (the same buffers as the outputs)
            dk = dk + add_refs[0][...].astype(jnp.float32)
            dv = dv + add_refs[1][...].astype(jnp.float32)
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward_dkv(cfg: Config, first: int, q, k, v, kinfo, qinfo, ids, cnt, lse, di, do,
                  fold: Optional[Fold] = None, add: Optional[Tuple[Array, Array]] = None):
    """dK, dV of key blocks ``[first, first + nk)`` (``k, v`` hold those blocks only);
    ``fold``: the global slots' gradients, added at their positions; ``add``: dK, dV
    of the same keys from another pass, accumulated in place (their buffers become
    the outputs)."""
    B = q.shape[0]
    bq, bk, W, hb = cfg.bq, cfg.bk, _width(cfg), cfg.heads
    Ng = _groups(cfg, q)
    lists = _Lists(cfg, ids, cnt, split=False)
    nkg, Lt = lists.n_rows, lists.length
    n_pre = len(lists.operands) + (fold is not None)

    def qb_of(b, n, kb, j, *pre):
        return lists.ids(pre, b, n, kb, j)

    def qmap(b, n, kb, j, *pre):
        return (b, qb_of(b, n, kb, j, *pre), n)

    def rowmap(b, n, kb, j, *pre):
        return (b, n, 0, qb_of(b, n, kb, j, *pre))

    def kmap(b, n, kb, j, *_):  # k, v hold this group's blocks only
        return (b, kb, n)

    def kinfo_map(b, n, kb, j, *_):
        return (b, 0, kb + first)

    def info_q(b, n, kb, j, *pre):
        return (b, n, qb_of(b, n, kb, j, *pre))

    extra_specs, extra = _common_specs(cfg, qinfo, None, info_q)
    in_specs = [_spec(cfg, bq, qmap),
                _spec(cfg, bk, kmap),
                _spec(cfg, bk, kmap),
                pl.BlockSpec((None, 3, bk), kinfo_map),
                pl.BlockSpec((None, None, hb, bq), rowmap),
                pl.BlockSpec((None, None, hb, bq), rowmap),
                _spec(cfg, bq, qmap)] + extra_specs
    args = [q, k, v, kinfo, lse, di, do, *extra]
    fold_specs, fold_args = _fold_specs(cfg, fold, nkg)
    in_specs += fold_specs
    args += fold_args
    aliases = {}
    if add is not None:
        aliases = {n_pre + len(args): 0, n_pre + len(args) + 1: 1}
        in_specs += [_spec(cfg, bk, kmap)] * 2
        args += list(add)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=n_pre, grid=(B, Ng, nkg, Lt), in_specs=in_specs,
        out_specs=[_spec(cfg, bk, kmap)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, W), jnp.float32), pltpu.VMEM((bk, W), jnp.float32)])
    kernel = functools.partial(_dkv_kernel, cfg=cfg, lists=lists,
                               scale=1.0 / math.sqrt(cfg.head_dim),
                               n_fold_blocks=_n_fold_blocks(fold), add=add is not None)
    isz = q.dtype.itemsize
    cost = pl.CostEstimate(flops=8 * B * Ng * hb * nkg * Lt * bq * bk * cfg.head_dim,
                           transcendentals=B * Ng * hb * nkg * Lt * bq * bk,
                           bytes_accessed=isz * B * Ng * (4 * nkg * bk * W + 2 * nkg * Lt * bq * W))
    return pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[_out(k.shape, k.dtype, k), _out(v.shape, v.dtype, k)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost, interpret=cfg.interpret, name="global_local_dkv",
        input_output_aliases=aliases,
    )(*lists.operands, *_fold_prefetch(fold), *args)


# ---------------------------------------------------------------------------
# The differentiable primitive.
# ---------------------------------------------------------------------------
class Pass(NamedTuple):
    """The static-shape, non-differentiable half of one pass.

    ``kinfo [B, 3, S]`` (see :func:`pallas_tpu_schedule.key_info`), ``qinfo``
    ``[B', N', R, Tq]`` or None, ``sched = (ids, count)`` the forward block
    lists, ``tsched`` the transposed lists (key block -> query blocks): one
    ``(ids, count)`` for the global slots (when ``n_global_blocks``), then one
    for the sequence.
    """

    kinfo: Array
    qinfo: Optional[Array]
    sched: Tuple[Array, Array]
    tsched: Tuple


class Slots(NamedTuple):
    """The global slots of the rows pass: ``keys`` (blocks of ``bk`` slots in
    front of the sequence's keys) and ``rows`` (the global-rows pass's query
    rows, blocks of its ``bq``)."""

    keys: SlotTable
    rows: SlotTable


# ---------------------------------------------------------------------------
# Gathering rows of a heads-first array.
# ---------------------------------------------------------------------------
# XLA:TPU gathers rows of [B, N, T, H] by first copying the whole array into a
# layout with T outermost (one slice per row contiguous): a full-size temporary
# for a few rows. This kernel fetches, per row, the aligned chunk of rows
# that holds it (all heads at once) and selects the row inside VMEM.
def _gather_kernel(pos_ref, x_ref, o_ref, *, L: int, T: int, chunk: int):
    b, l = pl.program_id(0), pl.program_id(1)
    p = pos_ref[b, 0, l]
    r = jnp.clip(p, 0, T - 1) % chunk
    j = l % chunk
    rows_in = x_ref[...].astype(jnp.float32)  # [N, chunk, H]
    row = rows_in[:, :1]
    for s in range(1, chunk):  # selects, not products: every value is copied as is
        row = jnp.where(r == s, rows_in[:, s:s + 1], row)
    row = jnp.where(p >= 0, row, jnp.zeros((), jnp.float32))  # an empty slot: zeros
    rows = lax.broadcasted_iota(jnp.int32, (1, chunk, 1), 1)
    # Row j of this output chunk; the rows before it were written by the previous
    # steps (the output block stays in VMEM while l walks through it).
    prev = jnp.where(j == 0, jnp.zeros((), jnp.float32), o_ref[...].astype(jnp.float32))
    o_ref[...] = jnp.where(rows == j, row, prev).astype(o_ref.dtype)


def gather_rows(x: Array, pos: Array, *, interpret: Any) -> Array:
    """``x[b, :, pos[b, l]]`` of a heads-first ``x [B, N, T, H]``, ``pos [B, L]``
    int32 -> ``[B, N, L, H]``, exactly (NaN, inf and -0 copied as they are).
    A negative position (an empty slot) gives a row of zeros; positions past
    the end are clamped to the last row, as by XLA's gather.

    One grid step per row: the aligned chunk of 16 rows that holds it (8 when
    ``T`` is not a multiple of 16; one sublane tile of bf16 / float32), all
    heads at once, is fetched by a scalar-prefetched index and the row
    selected in VMEM, so no copy of ``x`` is made (XLA:TPU's gather would
    first copy all of ``x`` into a layout with ``T`` outermost).
    """
    B, N, T, H = x.shape
    L = pos.shape[1]
    chunk = 16 if T % 16 == 0 else 8
    if T % chunk:
        raise ValueError(f"gather_rows: sequence length {T} is not a multiple of 8")
    Lp = -(-L // chunk) * chunk
    # Clamped inside (index map and kernel): the positions go in as they are, with no op
    # of XLA's before the call.
    pos3 = jnp.pad(pos.astype(jnp.int32), ((0, 0), (0, Lp - L)), constant_values=-1)[:, None]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(B, Lp),
        in_specs=[pl.BlockSpec((None, N, chunk, H),
                               lambda b, l, p: (b, 0, jnp.clip(p[b, 0, l], 0, T - 1) // chunk,
                                                0))],
        out_specs=pl.BlockSpec((None, N, chunk, H), lambda b, l, p: (b, 0, l // chunk, 0)))
    out = pl.pallas_call(
        functools.partial(_gather_kernel, L=Lp, T=T, chunk=chunk), grid_spec=grid_spec,
        out_shape=_out((B, N, Lp, H), x.dtype, x),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                      bytes_accessed=x.dtype.itemsize * B * N * Lp * H
                                      * (chunk + 1)),
        interpret=interpret, name="global_local_gather_rows",
    )(pos3, x)
    return out if Lp == L else out[:, :, :L]


def xla_take_rows(x: Array, idx: Array, valid: Array) -> Array:
    """``x[b, idx[b, l]]`` of ``x [B, T, W]`` (or ``x[b, :, idx[b, l]]`` of ``x [B, N, T,
    H]``) by XLA's gather, ``idx [B, L]``; zero where ``valid`` is False."""
    if x.ndim == 4:
        rows = jnp.take_along_axis(x, idx[:, None, :, None], axis=2)
        keep = valid[:, None, :, None]
    else:
        rows = jnp.take_along_axis(x, idx[:, :, None], axis=1)
        keep = valid[:, :, None]
    return jnp.where(keep, rows, jnp.zeros((), x.dtype))


def _gather_slots(cfg: Config, x: Array, pos: Array) -> Array:
    """Rows ``pos [B, L]`` of ``x`` along its sequence axis; zeros where ``pos`` is -1."""
    if cfg.heads_first:
        return gather_rows(x, pos, interpret=cfg.interpret)
    return xla_take_rows(x, jnp.maximum(pos, 0), pos >= 0)


def _dsinks(cfg: Config, sinks: Array, lse: Array, di: Array) -> Array:
    if not cfg.has_sinks:
        return jnp.zeros_like(sinks)
    B, _, _, Tq = lse.shape
    # d/d sink of an extra column with value 0: -p_sink * (do . out) per row.
    p_sink = jnp.exp(sinks[None, :, None] - lse.reshape(B, -1, Tq))
    return -jnp.sum(p_sink * di.reshape(B, -1, Tq), axis=(0, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attend(cfg: Config, cfg_g: Optional[Config], q: Array, k: Array, v: Array,
           qkv_g: Optional[Tuple[Array, Array, Array]], sinks: Array, rows: Pass,
           glob: Optional[Pass], slots: Optional[Slots], gathered) -> Array:
    """Block-sparse attention: the rows pass and, with ``cfg_g``, the global-rows pass.

    Arrays are token-major ``q [B, Tq, N * H]`` or, with ``cfg.heads_first``,
    ``[B, N, Tq, H]`` (shapes below token-major). Rows pass: ``q`` to
    ``[K_globals ; K]``, ``k, v [B, S, N * H]`` the sequence
    and, when ``cfg.n_global_blocks``, the global slots gathered from them
    (``slots.keys``). Global-rows pass (``cfg_g``): the global query rows of
    ``q`` (``slots.rows``) or ``qkv_g[0]`` (``[B, Gq, N * H]``, already
    gathered: ``global_qkv``), against ``k, v`` or ``qkv_g[1:]``; their
    outputs are written at their rows of the rows pass's output (rows the row
    code keeps empty there). ``sinks [N]`` float32 (ignored unless
    ``cfg.has_sinks``). Keys with an invalid code and rows with a nonzero row
    code may hold anything (NaN, inf): the kernels zero them where a product
    could reach a real output. With ``cfg.non_finite_rule`` the kernels apply
    the library's non-finite-key rule to every key block (and its derivative
    to dK / dV); otherwise ``k, v`` (and ``qkv_g``'s) must already obey it.
    Differentiable in the arrays; the backward
    folds the slots' dK / dV and the global rows' dQ into the sequence's
    inside the kernels, and the rows pass's dK / dV kernel adds the global-rows
    pass's in place. Returns ``[B, Tq, N * H]``.

    ``gathered = (q rows, k slots, v slots)`` (``[B, Gq | ng * bk, N * H]``,
    zero at empty slots, None where unused) must equal the rows of ``q, k,
    v`` at ``slots.rows.fold_pos`` / ``slots.keys.fold_pos``. They get no
    cotangent of their own: the backward attributes their gradients to ``q,
    k, v`` at those positions.
    """
    return _attend_fwd(cfg, cfg_g, q, k, v, qkv_g, sinks, rows, glob, slots, gathered)[0]


def _global_qkv(k, v, qkv_g, gathered):
    """The global-rows pass's operands and whether they are the rows pass's own."""
    if qkv_g is None:
        return (gathered[0], k, v), True
    return qkv_g, False


def _attend_fwd(cfg, cfg_g, q, k, v, qkv_g, sinks, rows, glob, slots, gathered):
    kg, vg = gathered[1:] if cfg.n_global_blocks else (None, None)
    fold = out_g = lse_g = None
    if cfg_g is not None:
        (qs, ks, vs), _ = _global_qkv(k, v, qkv_g, gathered)
        out_g, lse_g = _forward(cfg_g, qs, ks, vs, None, None, sinks, glob.kinfo, glob.qinfo,
                                *glob.sched)
        fold = Fold(slots.rows, (out_g,), cfg_g.bq)
    out, lse = _forward(cfg, q, k, v, kg, vg, sinks, rows.kinfo, rows.qinfo, *rows.sched,
                        fold=fold)
    return out, (q, k, v, qkv_g, sinks, rows, glob, slots, gathered, out, lse, out_g, lse_g)


def _attend_bwd(cfg, cfg_g, res, do):
    q, k, v, qkv_g, sinks, rows, glob, slots, gathered, out, lse, out_g, lse_g = res
    dqkv_g = None
    dq_fold = dk = dv = None
    dsinks = jnp.zeros_like(sinks)
    # Each pass: do . out, then dK / dV, then dQ, which is written over do's buffer.
    if cfg_g is not None:
        (qs, ks, vs), shared = _global_qkv(k, v, qkv_g, gathered)
        # Empty slots' rows are never written, so they get no cotangent (non-causal, they
        # attend every key with the gathered query of position 0).
        do_g = _gather_slots(cfg, do, slots.rows.fold_pos[:, 0])
        di_g = _row_dots(cfg_g, out_g, do_g, glob.qinfo)
        dk_g, dv_g = _backward_dkv(cfg_g, 0, qs, ks, vs, glob.kinfo, glob.qinfo, *glob.tsched[0],
                                   lse_g, di_g, do_g)
        dq_g = _backward_dq(cfg_g, qs, ks, vs, None, None, glob.kinfo, glob.qinfo,
                            *glob.sched, lse_g, di_g, do_g)
        dsinks = dsinks + _dsinks(cfg_g, sinks, lse_g, di_g)
        if shared:  # folded into the rows pass's dQ and added to its dK / dV
            dq_fold = Fold(slots.rows, (dq_g,), cfg_g.bq)
            dk, dv = dk_g, dv_g
        else:
            dqkv_g = (dq_g, dk_g, dv_g)
    kg, vg = gathered[1:] if cfg.n_global_blocks else (None, None)
    di = _row_dots(cfg, out, do, rows.qinfo)
    key_fold = None
    if cfg.n_global_blocks:
        dkv_slots = _backward_dkv(cfg, 0, q, kg, vg, rows.kinfo, rows.qinfo, *rows.tsched[0],
                                  lse, di, do)
        key_fold = Fold(slots.keys, tuple(dkv_slots), cfg.bk)
    # The global-rows pass's dK / dV (when it shares K / V) are accumulated in place.
    dk, dv = _backward_dkv(cfg, cfg.n_global_blocks, q, k, v, rows.kinfo, rows.qinfo,
                           *rows.tsched[-1], lse, di, do, fold=key_fold,
                           add=None if dk is None else (dk, dv))
    dq = _backward_dq(cfg, q, k, v, kg, vg, rows.kinfo, rows.qinfo, *rows.sched, lse, di, do,
                      fold=dq_fold)
    dsinks = dsinks + _dsinks(cfg, sinks, lse, di)
    # Inside shard_map, sinks replicated over axes that the rows vary over get
    # the sum of every shard's gradient (the transpose of that broadcast).
    spread = tuple(sorted(jax.typeof(dsinks).mat.varying - jax.typeof(sinks).mat.varying))
    if spread:
        dsinks = lax.psum(dsinks, spread)
    none = lambda t: jax.tree.map(lambda _: None, t)  # noqa: E731
    return dq, dk, dv, dqkv_g, dsinks, none(rows), none(glob), none(slots), none(gathered)


attend.defvjp(_attend_fwd, _attend_bwd)
