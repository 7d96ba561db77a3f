"""Pallas GPU kernels for the rows of ordinary (non-global) queries.

Row i attends, in one joint softmax: its local window, the global keys
outside the window, the keys of its BigBird random blocks not counted
otherwise, and the sink. Forward: one program per query block loops over the
key tiles of the three sets (window tiles fully inside every row's window
skip the window mask). Backward (given the forward's ``lse`` and
``delta = rowsum(out * dout)``):

* :func:`local_dq` -- one program per query block, the same loops, dQ;
* :func:`local_dkv` -- one program per key block, looping over the query
  blocks whose windows reach it, dK/dV of the window part;
* :func:`global_column_dkv` -- dK/dV of the gathered global keys, one program
  per (global tile, span of query blocks); spans are summed outside;
* :func:`random_dkv` -- dK/dV of the gathered random-block keys, one program
  per random key tile, looping over the rows of its BigBird query block.

All arrays are padded (see :class:`~globalattn.kernels.pallas_gpu_tiles.Plan`):
q/k/v ``[B, Tp, N, Hp]``; ``kbias [B, Tp]`` is 0 for a real key and ``-inf``
for padding; ``lse``/``delta`` are ``[B, N, Tp]`` float32; global keys
``[B, Gp, N, Hp]`` with positions ``gpos [B, Gp]``; random keys
``[B, n_random_tiles * rt, N, Hp]`` with positions ``rpos [B, N, ...]``
(position -1 = slot not counted).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from globalattn.kernels import pallas_gpu_tiles as tl
from globalattn.kernels.pallas_gpu_tiles import NEG_INF, Plan


def _params(p: Plan, warps_default: int):
    return pltriton.CompilerParams(num_warps=p.num_warps or warps_default,
                                   num_stages=p.num_stages)


def _iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _extras_specs(p: Plan):
    """BlockSpecs of the optional global-key and random-key inputs on grid (i, b, n)."""
    specs = []
    if p.G:
        specs += [pl.BlockSpec((None, p.Gp, None, p.Hp), lambda i, b, n: (b, 0, n, 0))] * 2
        specs += [pl.BlockSpec((None, p.Gp), lambda i, b, n: (b, 0))]
    if p.rbs:
        s = p.n_random_tiles * p.rt
        specs += [pl.BlockSpec((None, s, None, p.Hp), lambda i, b, n: (b, 0, n, 0))] * 2
        specs += [pl.BlockSpec((None, None, s), lambda i, b, n: (b, n, 0))]
    return specs


def _split_extras(p: Plan, refs):
    """(kg, vg, gpos) and (kr, vr, rpos) refs, each None when absent; the rest."""
    refs = list(refs)
    g = r = None
    if p.G:
        g, refs = refs[:3], refs[3:]
    if p.rbs:
        r, refs = refs[:3], refs[3:]
    return g, r, refs


def _loop_key_sets(p: Plan, qs, bq: int, bk: int, score, refs, g, r, tile_fn, carry):
    """Runs ``carry = tile_fn(carry, s, k, v)`` over every key tile that rows
    ``qs .. qs + bq - 1`` meet: window tiles of ``bk`` keys, global-column tiles
    and random tiles.

    ``score(k)`` gives the unmasked base-2 logits of the query block against
    keys ``k``; ``s`` is masked. The forward and the dQ kernel both call this,
    so they see exactly the same tiles and masks.
    """
    k_ref, v_ref, kb_ref = refs
    rows = qs + _iota(bq)
    lo, f_lo, f_hi, hi = tl.block_range(qs, bq, p.left, p.right, bk, p.T)

    def window(masked):
        def body(kb, c):
            ks = pl.multiple_of(kb * bk, bk)
            k = k_ref[pl.ds(ks, bk), :]
            v = v_ref[pl.ds(ks, bk), :]
            s = score(k) + kb_ref[pl.ds(ks, bk)][None, :]
            if masked:
                s = jnp.where(tl.in_window(p, rows, ks + _iota(bk)), s, NEG_INF)
            return tile_fn(c, s, k, v)
        return body

    carry = lax.fori_loop(lo, f_lo, window(True), carry)
    carry = lax.fori_loop(f_lo, f_hi, window(False), carry)
    carry = lax.fori_loop(f_hi, hi, window(True), carry)

    if g is not None:
        kg_ref, vg_ref, gpos_ref = g

        def gbody(t, c):
            gs = pl.multiple_of(t * p.bg, p.bg)
            k = kg_ref[pl.ds(gs, p.bg), :]
            v = vg_ref[pl.ds(gs, p.bg), :]
            ok = tl.global_column_mask(p, rows, gpos_ref[pl.ds(gs, p.bg)])
            return tile_fn(c, jnp.where(ok, score(k), NEG_INF), k, v)
        carry = lax.fori_loop(0, p.Gp // p.bg, gbody, carry)

    if r is not None:
        kr_ref, vr_ref, rpos_ref = r
        per_block = p.r * p.nrt  # random tiles per BigBird query block
        c_lo = lax.div(qs, p.rbs)
        c_hi = lax.div(jnp.minimum(qs + bq - 1, p.T - 1), p.rbs) + 1

        def rbody(t, c):
            rs = pl.multiple_of(t * p.rt, p.rt)
            k = kr_ref[pl.ds(rs, p.rt), :]
            v = vr_ref[pl.ds(rs, p.rt), :]
            ok = tl.random_mask(p, rows, rpos_ref[pl.ds(rs, p.rt)], lax.div(t, per_block))
            return tile_fn(c, jnp.where(ok, score(k), NEG_INF), k, v)
        carry = lax.fori_loop(c_lo * per_block, c_hi * per_block, rbody, carry)
    return carry


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, kb_ref, *refs, p: Plan):
    g, r, refs = _split_extras(p, refs)
    sink_ref = refs.pop(0) if p.has_sink else None
    o_ref, lse_ref = refs
    qs = pl.program_id(0) * p.bq
    q = q_ref[...]
    init = (jnp.full((p.bq,), NEG_INF, jnp.float32), jnp.zeros((p.bq,), jnp.float32),
            jnp.zeros((p.bq, p.Hp), jnp.float32))
    m, l, acc = _loop_key_sets(p, qs, p.bq, p.bk, lambda k: tl.scores(p, q, k),
                               (k_ref, v_ref, kb_ref), g, r,
                               lambda c, s, k, v: tl.online_update(c, s, v), init)
    out, lse = tl.finish_rows(m, l, acc, sink_ref[...] if p.has_sink else None)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def local_forward(p: Plan, q, k, v, kbias, extras, sink2):
    """Forward of the ordinary rows: ``(out [B, Tp, N, Hp], lse [B, N, Tp] base 2)``.

    ``extras``: the inputs of :func:`_extras_specs` in order; ``sink2``: the
    sink logits in base 2 broadcast to ``[N, bq]`` or None.
    """
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda i, b, n: (b, 0, n, 0))
    blk = pl.BlockSpec((None, p.bq, None, p.Hp), lambda i, b, n: (b, i, n, 0))
    in_specs = [blk, seq, seq, pl.BlockSpec((None, p.Tp), lambda i, b, n: (b, 0))]
    in_specs += _extras_specs(p)
    args = [q, k, v, kbias, *extras]
    if p.has_sink:
        in_specs.append(pl.BlockSpec((None, p.bq), lambda i, b, n: (n, 0)))
        args.append(sink2)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid=(p.Tp // p.bq, p.B, p.N),
        in_specs=in_specs,
        out_specs=[blk, pl.BlockSpec((None, None, p.bq), lambda i, b, n: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((p.B, p.N, p.Tp), jnp.float32)],
        compiler_params=_params(p, 4 if p.Hp <= 64 else 8),
        interpret=p.interpret,
        name="globalattn_local_fwd",
    )(*args)


# ---------------------------------------------------------------------------
# Backward: dQ.
# ---------------------------------------------------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, kb_ref, do_ref, lse_ref, delta_ref, *refs, p: Plan):
    g, r, (dq_ref,) = _split_extras(p, refs)
    qs = pl.program_id(0) * p.bqb
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def dq_tile(dq, s, k, v):
        _, ds = tl.tile_grads(s, lse, delta, do, v)
        return dq + tl.dot(ds.astype(k.dtype), k)

    dq = _loop_key_sets(p, qs, p.bqb, p.bkb, lambda k: tl.scores(p, q, k),
                        (k_ref, v_ref, kb_ref), g, r, dq_tile,
                        jnp.zeros((p.bqb, p.Hp), jnp.float32))
    dq_ref[...] = (dq * (p.scale2 / tl.LOG2E)).astype(dq_ref.dtype)


def local_dq(p: Plan, q, k, v, kbias, do, lse, delta, extras):
    """dQ of the ordinary rows, ``[B, Tp, N, Hp]`` (all key sets)."""
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda i, b, n: (b, 0, n, 0))
    blk = pl.BlockSpec((None, p.bqb, None, p.Hp), lambda i, b, n: (b, i, n, 0))
    row = pl.BlockSpec((None, None, p.bqb), lambda i, b, n: (b, n, i))
    in_specs = [blk, seq, seq, pl.BlockSpec((None, p.Tp), lambda i, b, n: (b, 0)), blk, row, row]
    in_specs += _extras_specs(p)
    return pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        grid=(p.Tp // p.bqb, p.B, p.N),
        in_specs=in_specs,
        out_specs=blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(p, 4 if p.Hp <= 64 else 8),
        interpret=p.interpret,
        name="globalattn_local_dq",
    )(q, k, v, kbias, do, lse, delta, *extras)


# ---------------------------------------------------------------------------
# Backward: dK/dV of the window part.
# ---------------------------------------------------------------------------
def _acc_dkv(p: Plan, carry, s, q, do, lse, delta, k, v):
    dk, dv = carry
    pr, ds = tl.tile_grads(s, lse, delta, do, v)
    dv = dv + tl.dot(pr.astype(do.dtype), do, ta=True)
    dk = dk + tl.dot(ds.astype(q.dtype), q, ta=True)
    return dk, dv


def _dkv_kernel(q_ref, k_ref, v_ref, kb_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                p: Plan):
    ks = pl.program_id(0) * p.bkb
    cols = ks + _iota(p.bkb)
    k, v, bias = k_ref[...], v_ref[...], kb_ref[...]
    # Rows that reach key j: j - right <= i <= j + left.
    lo, f_lo, f_hi, hi = tl.block_range(ks, p.bkb, p.right, p.left, p.bqb, p.T)

    def body(masked):
        def f(qb, c):
            qs = pl.multiple_of(qb * p.bqb, p.bqb)
            sl = pl.ds(qs, p.bqb)
            q, do = q_ref[sl, :], do_ref[sl, :]
            s = tl.scores(p, q, k) + bias[None, :]
            if masked:
                s = jnp.where(tl.in_window(p, qs + _iota(p.bqb), cols), s, NEG_INF)
            return _acc_dkv(p, c, s, q, do, lse_ref[sl], delta_ref[sl], k, v)
        return f

    c = (jnp.zeros((p.bkb, p.Hp), jnp.float32),) * 2
    c = lax.fori_loop(lo, f_lo, body(True), c)
    c = lax.fori_loop(f_lo, f_hi, body(False), c)
    dk, dv = lax.fori_loop(f_hi, hi, body(True), c)
    dk_ref[...] = (dk * (p.scale2 / tl.LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def local_dkv(p: Plan, q, k, v, kbias, do, lse, delta):
    """dK, dV ``[B, Tp, N, Hp]`` of the window part."""
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda i, b, n: (b, 0, n, 0))
    blk = pl.BlockSpec((None, p.bkb, None, p.Hp), lambda i, b, n: (b, i, n, 0))
    row = pl.BlockSpec((None, None, p.Tp), lambda i, b, n: (b, n, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, p=p),
        grid=(p.Tp // p.bkb, p.B, p.N),
        in_specs=[seq, blk, blk, pl.BlockSpec((None, p.bkb), lambda i, b, n: (b, i)),
                  seq, row, row],
        out_specs=[blk, blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(p, 4 if p.Hp <= 64 else 8),
        interpret=p.interpret,
        name="globalattn_local_dkv",
    )(q, k, v, kbias, do, lse, delta)


# ---------------------------------------------------------------------------
# Backward: dK/dV of the global columns (partial sums over spans of rows).
# ---------------------------------------------------------------------------
def _gcol_kernel(q_ref, do_ref, lse_ref, delta_ref, kg_ref, vg_ref, gpos_ref, dk_ref, dv_ref, *,
                 p: Plan):
    span = pl.program_id(1)
    k, v, gpos = kg_ref[...], vg_ref[...], gpos_ref[...]
    nqb = p.Tp // p.bqb

    def body(qb, c):
        qs = pl.multiple_of(qb * p.bqb, p.bqb)
        sl = pl.ds(qs, p.bqb)
        q, do = q_ref[sl, :], do_ref[sl, :]
        ok = tl.global_column_mask(p, qs + _iota(p.bqb), gpos)
        s = jnp.where(ok, tl.scores(p, q, k), NEG_INF)
        return _acc_dkv(p, c, s, q, do, lse_ref[sl], delta_ref[sl], k, v)

    c = (jnp.zeros((p.bg, p.Hp), jnp.float32),) * 2
    lo = span * p.split
    if p.causal:  # rows before the tile's first global key see none of it
        first = jnp.min(jnp.where(gpos >= 0, gpos, p.Tp))
        lo = jnp.maximum(lo, lax.div(jnp.minimum(first, p.Tp), p.bqb))
    dk, dv = lax.fori_loop(lo, jnp.minimum(span * p.split + p.split, nqb), body, c)
    dk_ref[...] = dk * (p.scale2 / tl.LOG2E)
    dv_ref[...] = dv


def global_column_dkv(p: Plan, q, do, lse, delta, kg, vg, gpos):
    """dK, dV of the gathered global keys, float32 ``[B, Gp, N, Hp]``."""
    nspan = -(-(p.Tp // p.bqb) // p.split)
    bn = lambda j: (lax.div(j, p.N), lax.rem(j, p.N))  # noqa: E731
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda g, s, j: (bn(j)[0], 0, bn(j)[1], 0))
    row = pl.BlockSpec((None, None, p.Tp), lambda g, s, j: (bn(j)[0], bn(j)[1], 0))
    gblk = pl.BlockSpec((None, p.bg, None, p.Hp), lambda g, s, j: (bn(j)[0], g, bn(j)[1], 0))
    out = pl.BlockSpec((None, None, p.bg, None, p.Hp),
                       lambda g, s, j: (s, bn(j)[0], g, bn(j)[1], 0))
    shape = jax.ShapeDtypeStruct((nspan, p.B, p.Gp, p.N, p.Hp), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_gcol_kernel, p=p),
        grid=(p.Gp // p.bg, nspan, p.B * p.N),
        in_specs=[seq, seq, row, row, gblk, gblk,
                  pl.BlockSpec((None, p.bg), lambda g, s, j: (bn(j)[0], g))],
        out_specs=[out, out],
        out_shape=[shape, shape],
        compiler_params=_params(p, 4 if p.Hp <= 64 else 8),
        interpret=p.interpret,
        name="globalattn_global_column_dkv",
    )(q, do, lse, delta, kg, vg, gpos)
    return jnp.sum(dk, axis=0), jnp.sum(dv, axis=0)


# ---------------------------------------------------------------------------
# Backward: dK/dV of the random-block keys.
# ---------------------------------------------------------------------------
def _random_kernel(q_ref, do_ref, lse_ref, delta_ref, kr_ref, vr_ref, rpos_ref, dk_ref, dv_ref,
                   *, p: Plan):
    t = pl.program_id(0)
    qblock = lax.div(t, p.r * p.nrt)
    k, v, rpos = kr_ref[...], vr_ref[...], rpos_ref[...]
    c = (jnp.zeros((p.rt, p.Hp), jnp.float32),) * 2
    # The rows of BigBird block `qblock` start at an arbitrary offset: unaligned
    # loads of bqb rows (the arrays carry rbs + bqb rows of slack).
    for u in range(-(-p.rbs // p.bqb)):
        qs = qblock * p.rbs + u * p.bqb
        sl = pl.ds(qs, p.bqb)
        q, do = q_ref[sl, :], do_ref[sl, :]
        ok = tl.random_mask(p, qs + _iota(p.bqb), rpos, qblock)
        s = jnp.where(ok, tl.scores(p, q, k), NEG_INF)
        c = _acc_dkv(p, c, s, q, do, lse_ref[sl], delta_ref[sl], k, v)
    dk, dv = c
    dk_ref[...] = (dk * (p.scale2 / tl.LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def random_dkv(p: Plan, q, do, lse, delta, kr, vr, rpos):
    """dK, dV of the gathered random keys, shaped like ``kr`` (dtype of ``kr``)."""
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda t, b, n: (b, 0, n, 0))
    row = pl.BlockSpec((None, None, p.Tp), lambda t, b, n: (b, n, 0))
    tile = pl.BlockSpec((None, p.rt, None, p.Hp), lambda t, b, n: (b, t, n, 0))
    return pl.pallas_call(
        functools.partial(_random_kernel, p=p),
        grid=(p.n_random_tiles, p.B, p.N),
        in_specs=[seq, seq, row, row, tile, tile,
                  pl.BlockSpec((None, None, p.rt), lambda t, b, n: (b, n, t))],
        out_specs=[tile, tile],
        out_shape=[jax.ShapeDtypeStruct(kr.shape, kr.dtype), jax.ShapeDtypeStruct(vr.shape, vr.dtype)],
        compiler_params=_params(p, 4 if p.Hp <= 64 else 8),
        interpret=p.interpret,
        name="globalattn_random_dkv",
    )(q, do, lse, delta, kr, vr, rpos)
