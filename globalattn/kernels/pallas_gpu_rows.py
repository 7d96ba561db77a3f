"""Pallas GPU kernels for the global query rows.

A global row attends every real key (``j <= i`` when causal) and the sink,
with its own query (``q_g``) against ``k_g``/``v_g`` when ``global_qkv`` is
given. There are only G such rows, each as long as the sequence, so the key
axis is split into spans of ``split`` key blocks: each program reduces one
(row tile, span) and the spans are merged outside the kernel (flash-decoding),
which keeps the GPU busy when G is small.

* :func:`rows_forward` -- partial ``(acc, m, l)`` per span, merged by
  :func:`merge_spans` into the rows' output and ``lse``;
* :func:`rows_dq` -- partial dQ of the rows per span, summed outside;
* :func:`rows_dkv` -- dK/dV of every key from the G rows, one program per
  key block looping over the row tiles.

Shapes as in :mod:`globalattn.kernels.pallas_gpu_local`; the rows are
gathered queries ``q_rows [B, Gp, N, Hp]`` at positions ``gpos [B, Gp]``
(-1 = empty slot; its output is never used).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from globalattn.kernels import pallas_gpu_tiles as tl
from globalattn.kernels.pallas_gpu_tiles import NEG_INF, Plan


def _params(p: Plan):
    return pltriton.CompilerParams(num_warps=p.num_warps or (4 if p.Hp <= 64 else 8),
                                   num_stages=p.num_stages)


def _iota(n: int):
    return lax.broadcasted_iota(jnp.int32, (n,), 0)


def _row_mask(p: Plan, gpos, cols):
    """[bg, C]: the global row at ``gpos`` may attend key ``cols`` (padding is in the bias)."""
    ok = (gpos[:, None] >= 0) & (cols[None, :] < p.T)
    if p.causal:
        ok = ok & (cols[None, :] <= gpos[:, None])
    return ok


def _bn(p: Plan, j):
    return lax.div(j, p.N), lax.rem(j, p.N)


def _nspan(p: Plan, block: int) -> int:
    return -(-(p.Tp // block) // p.split)


def _span_specs(p: Plan):
    """Specs shared by the split kernels on grid (row tile g, span s, b * N + n)."""
    seq = pl.BlockSpec((None, p.Tp, None, p.Hp), lambda g, s, j: (_bn(p, j)[0], 0, _bn(p, j)[1], 0))
    rows = pl.BlockSpec((None, p.bg, None, p.Hp), lambda g, s, j: (_bn(p, j)[0], g, _bn(p, j)[1], 0))
    gpos = pl.BlockSpec((None, p.bg), lambda g, s, j: (_bn(p, j)[0], g))
    bias = pl.BlockSpec((None, p.Tp), lambda g, s, j: (_bn(p, j)[0], 0))
    return seq, rows, gpos, bias


def _span_loop(p: Plan, gpos, body, carry):
    """Runs ``body`` over this program's span of key blocks.

    Causal rows stop at the last key block any row of the tile may see.
    """
    lo = pl.program_id(1) * p.split
    hi = jnp.minimum(lo + p.split, p.Tp // p.bk)
    if p.causal:
        hi = jnp.minimum(hi, tl.cdiv(jnp.max(gpos) + 1, p.bk))
    return lax.fori_loop(lo, hi, body, carry)


# ---------------------------------------------------------------------------
# Forward.
# ---------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, kb_ref, gpos_ref, acc_ref, m_ref, l_ref, *, p: Plan):
    q, gpos = q_ref[...], gpos_ref[...]

    def body(kb, c):
        ks = pl.multiple_of(kb * p.bk, p.bk)
        k, v = k_ref[pl.ds(ks, p.bk), :], v_ref[pl.ds(ks, p.bk), :]
        s = tl.scores(p, q, k) + kb_ref[pl.ds(ks, p.bk)][None, :]
        s = jnp.where(_row_mask(p, gpos, ks + _iota(p.bk)), s, NEG_INF)
        return tl.online_update(c, s, v)

    init = (jnp.full((p.bg,), NEG_INF, jnp.float32), jnp.zeros((p.bg,), jnp.float32),
            jnp.zeros((p.bg, p.Hp), jnp.float32))
    m, l, acc = _span_loop(p, gpos, body, init)
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def rows_forward(p: Plan, q_rows, k, v, kbias, gpos):
    """Per-span partials ``(acc [S, B, Gp, N, Hp], m [S, B, N, Gp], l [S, B, N, Gp])``."""
    S = _nspan(p, p.bk)
    seq, rows, gspec, bias = _span_specs(p)
    stat = pl.BlockSpec((None, None, None, p.bg),
                        lambda g, s, j: (s, _bn(p, j)[0], _bn(p, j)[1], g))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid=(p.Gp // p.bg, S, p.B * p.N),
        in_specs=[rows, seq, seq, bias, gspec],
        out_specs=[pl.BlockSpec((None, None, p.bg, None, p.Hp),
                                lambda g, s, j: (s, _bn(p, j)[0], g, _bn(p, j)[1], 0)),
                   stat, stat],
        out_shape=[jax.ShapeDtypeStruct((S, p.B, p.Gp, p.N, p.Hp), jnp.float32),
                   jax.ShapeDtypeStruct((S, p.B, p.N, p.Gp), jnp.float32),
                   jax.ShapeDtypeStruct((S, p.B, p.N, p.Gp), jnp.float32)],
        compiler_params=_params(p),
        interpret=p.interpret,
        name="globalattn_rows_fwd",
    )(q_rows, k, v, kbias, gpos)


def merge_spans(acc, m, l, sink2: Optional[jax.Array]):
    """Merges span partials (and the sink) into ``(out [B, Gp, N, Hp] f32, lse [B, N, Gp])``.

    Plain JAX: O(S * G * H) work. ``sink2``: ``[N]`` base-2 sink logits or None.
    """
    mx = jnp.max(m, axis=0)
    if sink2 is not None:
        mx = jnp.maximum(mx, sink2[None, :, None])
    shift = jnp.where(mx == NEG_INF, 0.0, mx)
    w = jnp.exp2(m - shift)  # [S, B, N, Gp]
    den = jnp.sum(w * l, axis=0)
    if sink2 is not None:
        den = den + jnp.exp2(sink2[None, :, None] - shift)
    num = jnp.einsum("sbng,sbgnh->bgnh", w, acc)
    ok = den > 0
    safe = jnp.where(ok, den, 1.0)
    out = num / jnp.transpose(safe, (0, 2, 1))[..., None]
    lse = jnp.where(ok, shift + jnp.log2(safe), 0.0)
    return out, lse


# ---------------------------------------------------------------------------
# Backward.
# ---------------------------------------------------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, kb_ref, gpos_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               p: Plan):
    q, gpos, do, lse, delta = q_ref[...], gpos_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

    def body(kb, dq):
        ks = pl.multiple_of(kb * p.bk, p.bk)
        k, v = k_ref[pl.ds(ks, p.bk), :], v_ref[pl.ds(ks, p.bk), :]
        s = tl.scores(p, q, k) + kb_ref[pl.ds(ks, p.bk)][None, :]
        s = jnp.where(_row_mask(p, gpos, ks + _iota(p.bk)), s, NEG_INF)
        _, ds = tl.tile_grads(s, lse, delta, do, v)
        return dq + tl.dot(ds.astype(k.dtype), k)

    dq = _span_loop(p, gpos, body, jnp.zeros((p.bg, p.Hp), jnp.float32))
    dq_ref[...] = dq * (p.scale2 / tl.LOG2E)


def rows_dq(p: Plan, q_rows, k, v, kbias, gpos, do_rows, lse, delta):
    """dQ of the gathered rows, float32 ``[B, Gp, N, Hp]`` (spans summed)."""
    S = _nspan(p, p.bk)
    seq, rows, gspec, bias = _span_specs(p)
    stat = pl.BlockSpec((None, None, p.bg), lambda g, s, j: (_bn(p, j)[0], _bn(p, j)[1], g))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        grid=(p.Gp // p.bg, S, p.B * p.N),
        in_specs=[rows, seq, seq, bias, gspec, rows, stat, stat],
        out_specs=pl.BlockSpec((None, None, p.bg, None, p.Hp),
                               lambda g, s, j: (s, _bn(p, j)[0], g, _bn(p, j)[1], 0)),
        out_shape=jax.ShapeDtypeStruct((S, p.B, p.Gp, p.N, p.Hp), jnp.float32),
        compiler_params=_params(p),
        interpret=p.interpret,
        name="globalattn_rows_dq",
    )(q_rows, k, v, kbias, gpos, do_rows, lse, delta)
    return jnp.sum(dq, axis=0)


def _dkv_kernel(q_ref, k_ref, v_ref, kb_ref, gpos_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, p: Plan):
    ks = pl.program_id(0) * p.bkb
    cols = ks + _iota(p.bkb)
    k, v, bias = k_ref[...], v_ref[...], kb_ref[...]

    def body(t, c):
        dk, dv = c
        gs = pl.multiple_of(t * p.bg, p.bg)
        sl = pl.ds(gs, p.bg)
        q, do = q_ref[sl, :], do_ref[sl, :]
        s = tl.scores(p, q, k) + bias[None, :]
        s = jnp.where(_row_mask(p, gpos_ref[sl], cols), s, NEG_INF)
        pr, ds = tl.tile_grads(s, lse_ref[sl], delta_ref[sl], do, v)
        return (dk + tl.dot(ds.astype(q.dtype), q, ta=True),
                dv + tl.dot(pr.astype(do.dtype), do, ta=True))

    c = (jnp.zeros((p.bkb, p.Hp), jnp.float32),) * 2
    dk, dv = lax.fori_loop(0, p.Gp // p.bg, body, c)
    dk_ref[...] = (dk * (p.scale2 / tl.LOG2E)).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def rows_dkv(p: Plan, q_rows, k, v, kbias, gpos, do_rows, lse, delta):
    """dK, dV ``[B, Tp, N, Hp]`` of every key from the global rows."""
    blk = pl.BlockSpec((None, p.bkb, None, p.Hp), lambda i, b, n: (b, i, n, 0))
    rows = pl.BlockSpec((None, p.Gp, None, p.Hp), lambda i, b, n: (b, 0, n, 0))
    stat = pl.BlockSpec((None, None, p.Gp), lambda i, b, n: (b, n, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, p=p),
        grid=(p.Tp // p.bkb, p.B, p.N),
        in_specs=[rows, blk, blk, pl.BlockSpec((None, p.bkb), lambda i, b, n: (b, i)),
                  pl.BlockSpec((None, p.Gp), lambda i, b, n: (b, 0)), rows, stat, stat],
        out_specs=[blk, blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(p),
        interpret=p.interpret,
        name="globalattn_rows_dkv",
    )(q_rows, k, v, kbias, gpos, do_rows, lse, delta)
