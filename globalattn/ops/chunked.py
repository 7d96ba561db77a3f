"""Rows in chunks with a hand-written backward: the ``'xla'`` implementation's loop.

The rows go through in chunks, one ``lax.map`` step each. A chunk builds its
parts (:class:`globalattn.ops.core.PartOps`: queries, keys, values and mask
of each part) from its own slice of the inputs and normalises them together
(:func:`globalattn.ops.core.joint_softmax`). The forward keeps per row only
the output and the log normaliser ``lse``; the backward rebuilds each chunk's
parts, recomputes their scores and forms the gradients from them directly, as
flash attention does::

    p = exp(s - lse)    dV = p^T dO    dP = dO V^T    dS = p (dP - rowsum(dO * out))
    dQ = scale dS K     dK = scale dS^T Q               d sink = -sum_rows p_sink rowsum(...)

instead of differentiating the forward's max, sums and normalisation. A chunk
reads windows of the inputs (its rows, their keys) and adds its gradients
into the same entries in place: no per-chunk work the size of the sequence.
Measured on a 2-core CPU (``experiments/bench.py``, T = 8192, window 256,
64 globals): see ``results/bench.md``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops import core

Array = jax.Array
F32 = jnp.float32

__all__ = ["chunked_attention", "row_chunks", "window_attention"]


def row_chunks(x: Array, axis: int, n: int, rows: int) -> Array:
    """``x`` with ``n * rows`` entries on ``axis`` -> ``[n, ...]``, chunk i its rows
    ``i * rows .. (i + 1) * rows - 1`` (the rest of ``x``'s axes in order)."""
    x = x.reshape(x.shape[:axis] + (n, rows) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _part_grads(q: Array, k: Array, v: Array, mask: Array, lse: Array, dsum: Array,
                dout: Array, scale: float):
    """Gradients of one part's ``(q, k, v)`` given its rows' ``lse``, ``rowsum(dO * out)``
    (``[B, N, R]``) and ``dO`` (``[B, N, R, H]``, float32)."""
    c, qn = q.shape[2:4]
    lse_p = core.unrows(lse, c, qn)[..., None, :]  # [B, N, c, 1, q]
    dsum_p = core.unrows(dsum, c, qn)[..., None, :]
    do_p = core.unrows(dout, c, qn)
    # Key-major ([..., K, q]): the gradients of K and V are then plain products
    # (measured on XLA:CPU: products that contract the first axis of both operands
    # ran at about half the speed).
    s = jnp.einsum("bnckh,bncqh->bnckq", k, q, preferred_element_type=F32) * scale
    # Masked pairs (whatever their score, NaN included) have probability 0.
    p = jnp.where(jnp.swapaxes(mask, -1, -2), jnp.exp(s - lse_p), 0.0)
    dv = jnp.einsum("bnckq,bncqh->bnckh", p, do_p, preferred_element_type=F32)
    dp = jnp.einsum("bnckh,bncqh->bnckq", v, do_p, preferred_element_type=F32)
    ds = p * (dp - dsum_p) * scale
    dq = jnp.einsum("bnckq,bnckh->bncqh", ds, k, preferred_element_type=F32)
    dk = jnp.einsum("bnckq,bncqh->bnckh", ds, q, preferred_element_type=F32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def chunked_attention(build: Callable[..., List[core.PartOps]], windows: Dict[str, Array],
                      lengths: Dict[str, int], consts: Any, windows_aux: Dict[str, Array],
                      consts_aux: Any, sinks: Optional[Array], *, n: int, rows: int,
                      n_rows: int, scale: float) -> Array:
    """One joint softmax per row over the parts ``build`` makes, chunk by chunk.

    Args:
      build: ``build(x, c, xa, ca) -> [PartOps]``: the parts of chunk i (rows
        ``i * rows ..``), from its windows ``x`` (name -> window of
        ``windows[name]``) and ``xa`` (of ``windows_aux``, plus ``xa['r0'] = i *
        rows``), and all of ``consts`` (``c``) and ``consts_aux`` (``ca``).
        Differentiable in ``x`` and ``c``; it must use no other traced arrays.
      windows: name -> float ``[B, N, S, H]`` read in windows along axis 2:
        chunk i reads entries ``i * rows .. i * rows + lengths[name] - 1``.
        Differentiated.
      consts: pytree of float arrays every chunk reads whole; differentiated.
      windows_aux: name -> ``[B, S]`` read in windows along axis 1 (lengths as
        above); consts_aux: pytree read whole. Neither differentiated.
      sinks: ``[N]`` float32 sink logits, or None.
      n: chunks; rows: rows per chunk; n_rows: rows of the result (``<= n * rows``).
      scale: score scale.

    Returns:
      float32 ``[B, N, n_rows, H]``: row ``i * rows + r`` is row r of chunk i.
    """
    has_sinks = sinks is not None
    sinks_in = sinks if has_sinks else jnp.zeros((1,), F32)

    def slices(win, win_aux, r0):
        x = {name: jax.lax.dynamic_slice_in_dim(a, r0, lengths[name], 2)
             for name, a in win.items()}
        xa = {name: jax.lax.dynamic_slice_in_dim(a, r0, lengths[name], 1)
              for name, a in win_aux.items()}
        xa["r0"] = r0
        return x, xa

    def forward(win, consts, s, win_aux, consts_aux):
        def chunk(i):
            x, xa = slices(win, win_aux, i * rows)
            parts = [core.scored(o, scale) for o in build(x, consts, xa, consts_aux)]
            return core.joint_softmax(parts, rows, sinks=s if has_sinks else None,
                                      return_lse=True)

        out, lse = jax.lax.map(chunk, jnp.arange(n, dtype=jnp.int32))  # [n,B,N,R,H], [n,B,N,R]
        full = jnp.moveaxis(out, 0, 2)  # [B, N, n, R, H]
        full = full.reshape(full.shape[:2] + (-1, full.shape[-1]))[:, :, :n_rows]
        return full, (win, consts, s, win_aux, consts_aux, out, lse)

    @jax.custom_vjp
    def attend(win, consts, s, win_aux, consts_aux):
        return forward(win, consts, s, win_aux, consts_aux)[0]

    def backward(res, dout):
        win, consts, s, win_aux, consts_aux, out, lse = res
        dout = jnp.pad(dout.astype(F32), ((0, 0), (0, 0), (0, n * rows - n_rows), (0, 0)))
        dout = row_chunks(dout, 2, n, rows)  # [n, B, N, R, H]
        dsum = jnp.sum(dout * out, axis=-1)  # [n, B, N, R]

        def step(carry, a):
            dwin, dc_acc, ds_acc = carry
            i, lse_i, dsum_i, do_i = a
            r0 = i * rows
            x, xa = slices(win, win_aux, r0)

            def parts(x, c):
                ops = build(x, c, xa, consts_aux)
                return [(o.q, o.k, o.v) for o in ops], [o.mask for o in ops]

            qkv, pull, masks = jax.vjp(parts, x, consts, has_aux=True)
            grads = [tuple(_typed_like(g, p) for g, p in
                           zip(_part_grads(*t, m, lse_i, dsum_i, do_i, scale), t))
                     for t, m in zip(qkv, masks)]
            dx, dc = pull(grads)
            # Each window's gradient is added into its own entries (in place).
            dwin = {name: jax.lax.dynamic_update_slice_in_dim(
                        g, jax.lax.dynamic_slice_in_dim(g, r0, lengths[name], 2)
                        + dx[name].astype(F32), r0, 2) for name, g in dwin.items()}
            dc_acc = jax.tree.map(jnp.add, dc_acc, dc)
            if has_sinks:  # the sink's value is 0: its dP is 0
                p_sink = jnp.exp(s[None, :, None] - lse_i)  # [B, N, R]
                ds_acc = ds_acc - _typed_like(jnp.sum(p_sink * dsum_i, axis=(0, 2)), s)
            return (dwin, dc_acc, ds_acc), None

        zero_w = {name: jnp.zeros_like(a, F32) for name, a in win.items()}
        zero_c = jax.tree.map(jnp.zeros_like, consts)
        (dwin, dc, ds), _ = jax.lax.scan(
            step, (zero_w, zero_c, jnp.zeros_like(s)),
            (jnp.arange(n, dtype=jnp.int32), lse, dsum, dout))
        dwin = {name: g.astype(win[name].dtype) for name, g in dwin.items()}
        return dwin, dc, ds, _no_grad(win_aux), _no_grad(consts_aux)

    attend.defvjp(forward, backward)
    return attend(windows, consts, sinks_in, windows_aux, consts_aux)


def _varying(x: Array) -> frozenset:
    """The manual mesh axes (``shard_map``) along which ``x`` varies."""
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset()


def _typed_like(ct: Array, primal: Array) -> Array:
    """A cotangent typed like its primal inside ``shard_map``: summed over the axes
    it varies along and the primal does not (the primal was used by every shard),
    cast to varying along the primal's other axes."""
    extra = tuple(sorted(_varying(ct) - _varying(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    missing = tuple(sorted(_varying(primal) - _varying(ct)))
    if missing:
        ct = jax.lax.pcast(ct, missing, to="varying")
    return ct


def _no_grad(tree: Any) -> Any:
    """Zero cotangents for non-differentiated (integer / bool / float) leaves."""
    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)
    return jax.tree.map(zero, tree)


def window_attention(w: core.WindowRows, *, scale: float, n_rows: int,
                     sinks: Optional[Array] = None,
                     columns: Optional[Tuple[Array, Array, Array, Array]] = None,
                     pos0: Union[int, Array] = 0, is_causal: bool = False,
                     random: Optional[Tuple[Array, Array, Array, Optional[Array], Array, int]]
                     = None) -> Array:
    """Rows ``0 .. n_rows - 1`` of ``w`` (:func:`globalattn.ops.core.window_rows`,
    chunks of ``w.rows``) against their window (:func:`core.local_part_ops`), with
    ``columns = (k_g, v_g, gpos, gvalid)`` the global keys outside it
    (:func:`core.global_column_part_ops`; row r of ``w`` is at position ``pos0 +
    r``), and with ``random = (k, v, pad, glob, random_blocks, block_size)``
    BigBird's random blocks (:func:`core.random_part_ops`; ``random_blocks`` of
    every chunk's rows, padding rows' draws -1). Returns float32 ``[B, N, n_rows, H]``.
    """
    R = w.rows
    n = w.q.shape[2] // R
    L = w.lead + R + w.trail  # the keys a chunk's local part reads
    windows, lengths = dict(q=w.q, k=w.k, v=w.v), dict(q=R, k=L, v=L, q_ok=R, k_ok=L)
    windows_aux = dict(q_ok=w.q_ok, k_ok=w.k_ok)
    consts: dict = {}
    consts_aux: dict = dict(pos0=jnp.asarray(pos0, jnp.int32))
    if columns is not None:
        k_g, v_g, gpos, gvalid = columns
        consts.update(k_g=k_g, v_g=v_g)
        consts_aux.update(gpos=gpos, gvalid=gvalid)
    bs = None
    if random is not None:
        k, v, pad, glob, rb, bs = random
        consts.update(k=k, v=v)
        consts_aux.update(pad=pad, glob=glob, rb=rb)

    def build(x, c, xa, ca):  # the parts of one chunk of R rows
        q_ok, r0 = xa["q_ok"], xa["r0"]
        q_c = jnp.where(q_ok[:, None, :, None], x["q"], jnp.zeros((), x["q"].dtype))
        ops = [core.local_part_ops(q_c, x["k"], x["v"], q_ok, xa["k_ok"], left=w.left,
                                   right=w.right, block_q=w.block_q, lead=w.lead)]
        if columns is not None:
            qpos = ca["pos0"] + r0 + jnp.arange(R, dtype=jnp.int32)
            ops.append(core.global_column_part_ops(q_c, c["k_g"], c["v_g"], ca["gpos"],
                                                   ca["gvalid"], qpos, q_ok, left=w.left,
                                                   right=w.right, is_causal=is_causal))
        if random is not None:
            rb_c = jax.lax.dynamic_slice_in_dim(ca["rb"], r0 // bs, R // bs, 2)
            ops.append(core.random_part_ops(q_c, c["k"], c["v"], q_ok, ca["pad"], ca["glob"],
                                            rb_c, bs, row0=ca["pos0"] + r0, left=w.left,
                                            right=w.right, is_causal=is_causal))
        return ops

    return chunked_attention(build, windows, lengths, consts, windows_aux, consts_aux, sinks,
                             n=n, rows=R, n_rows=n_rows, scale=scale)
