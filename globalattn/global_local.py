"""The efficient global + local attention kernel (pure JAX, jit-friendly).

The attention of one row i is a single softmax over the union of four key sets,
each counted once:

* local:  keys ``i - left <= j <= i + right`` -- computed blockwise: query
  block c (``block_q`` rows) scores a key slab of ``block_q + Lp + Rp`` keys,
  where Lp/Rp are left/right rounded up to multiples of ``block_q``;
* global columns: the G global keys outside i's window;
* random: the keys of i's BigBird random blocks not already counted;
* sink: an extra column with logit ``sinks[n]`` and value 0.

The four parts share one row max and one denominator (a joint softmax), so the
result equals dense attention over the union exactly, up to float rounding.
Global rows (which see every key) are computed separately as G full rows and
written over the blockwise result. Nothing of size T x T is ever formed.

Cost: O(B*N*T*(block_q + left + right + G + r*block_size)) time and memory.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from globalattn import _validate as V
from globalattn.attention import Window, gather_global_positions

Array = jax.Array

__all__ = ["global_local_attention", "default_block_q"]

_F32 = jnp.float32
# Value written into internal block padding. Always 0 in use; tests set it to
# NaN to prove that padding never reaches an output or a gradient.
_BLOCK_PAD_FILL = 0.0


def default_block_q(seq_len: int, left: int, right: int) -> int:
    """Query block for the local part.

    Each row of a block scores ``block_q + Lp + Rp`` keys of which it needs
    ``left + right + 1``: small blocks waste fewer flops, large blocks give
    bigger matmuls. 64 is a good trade on CPU for windows of a few hundred;
    a block never exceeds the (rounded) sequence or ``max(left, right)``.
    """
    w = max(left, right, 1)
    bq = 64 if w >= 64 else max(8, 1 << (w - 1).bit_length())
    return int(min(bq, max(8, 1 << (seq_len - 1).bit_length())))


def _shift_blocks(x: Array, nb: int, n_left: int, n_right: int, bq: int) -> Array:
    """Key slabs: for each of nb query blocks, ``n_left + 1 + n_right`` key blocks.

    x: ``[B, nb*bq, ...]`` already padded to block multiples.
    Returns ``[B, nb, (n_left + 1 + n_right)*bq, ...]``.
    """
    tail = x.shape[2:]
    pad = [(0, 0), (n_left * bq, n_right * bq)] + [(0, 0)] * len(tail)
    fill = False if x.dtype == jnp.bool_ else _BLOCK_PAD_FILL
    xp = jnp.pad(x, pad, constant_values=fill)
    xb = xp.reshape((x.shape[0], nb + n_left + n_right, bq) + tail)
    parts = [xb[:, s:s + nb] for s in range(n_left + 1 + n_right)]
    return jnp.concatenate(parts, axis=2)


def _row_stat(x: Array, T: int) -> Array:
    """[B, N, rows_padded] -> [B, N, T]."""
    return x[..., :T]


def _to_rows(x: Array, rows: int) -> Array:
    """Pads a [B, N, T] row statistic to [B, N, rows]."""
    T = x.shape[-1]
    return jnp.pad(x, [(0, 0), (0, 0), (0, rows - T)]) if rows > T else x


def global_local_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    local_window_size: Window,
    global_mask: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
    is_causal: bool = False,
    max_globals: Optional[int] = None,
    random_blocks: Optional[Array] = None,
    block_size: Optional[int] = None,
    global_qkv: Optional[Tuple[Array, Array, Array]] = None,
    sinks: Optional[Array] = None,
    block_q: Optional[int] = None,
) -> Array:
    """Sliding-window + global-token (+ BigBird random block) self-attention.

    Equals ``dense_attention(q, k, v, global_local_mask(T, ...))`` (see
    :func:`globalattn.global_local_mask` for the pattern) at
    O(B*N*T*(window + G + r*block_size)) cost.

    Args:
      q, k, v: ``[B, T, N, H]`` (self-attention: keys and queries share positions).
      local_window_size: int w (= (w, w)) or (left, right): query i sees keys
        ``i - left <= j <= i + right``, as in ``jax.nn.dot_product_attention``.
      global_mask: bool ``[B, T]``; a global query attends every valid key and
        every valid query attends every global key. Flags on padding are ignored.
      padding_mask: bool ``[B, T]``, True = real token. Padded keys are never
        attended; padded query rows are exactly 0.
      is_causal: every pair, global ones included, needs ``j <= i``.
      max_globals: static capacity G of the global buffer. Required when
        ``global_mask`` is traced; when concrete and None, G is the largest
        per-example count. When an example has more than G globals: outside jit
        a ValueError naming the counts; inside jit that example's whole output
        is NaN (never silently truncated), so the loss shows it.
      random_blocks: int ``[B or 1, N or 1, ceil(T/block_size), r]`` key-block
        indices (see :func:`globalattn.random_block_indices`).
      block_size: BigBird block size; required with ``random_blocks``.
      global_qkv: ``(q_g, k_g, v_g)``, each ``[B, T, N, H]``: global query rows
        use ``q_g`` against ``k_g``/``v_g`` of all tokens (Longformer).
      sinks: ``[N]`` per-head sink logits (extra column with value 0).
      block_q: static query-block size of the local part (a tuning knob; the
        result does not depend on it). Default :func:`default_block_q`.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    B, T, N, H = V.check_qkv(q, k, v)
    if k.shape[1] != T:
        raise ValueError(
            f"global_local_attention is self-attention: k/v length {k.shape[1]} must equal "
            f"q length {T}")
    left, right = V.normalize_window(local_window_size)
    if is_causal:
        right = 0
    # A window beyond the sequence adds nothing: clip it so no work is wasted.
    left, right = min(left, T - 1), min(right, T - 1)
    pad = V.check_token_mask(padding_mask, B, T, "padding_mask", default=True)
    sinks = V.check_sinks(sinks, N)
    if global_qkv is not None:
        if len(global_qkv) != 3:
            raise ValueError(f"global_qkv must be (q_g, k_g, v_g), got {len(global_qkv)} items")
        for name, x in zip(("q_g", "k_g", "v_g"), global_qkv):
            if x.shape != q.shape:
                raise ValueError(f"global_qkv {name} must have shape {q.shape}, got {x.shape}")

    # Globals: a fixed [B, G] buffer (G static).
    G = 0
    glob = None
    if global_mask is not None:
        glob = V.check_token_mask(global_mask, B, T, "global_mask", default=False) & pad
        counts = None
        if V.is_concrete(glob):
            counts = [int(c) for c in jnp.sum(glob, axis=-1)]
        if max_globals is None:
            if counts is None:
                raise ValueError(
                    "max_globals (a static int) is required when global_mask is traced "
                    "(e.g. under jit)")
            G = max(counts) if counts else 0
        else:
            G = V.check_nonneg_int(max_globals, "max_globals")
            if counts is not None and max(counts, default=0) > G:
                over = {b: c for b, c in enumerate(counts) if c > G}
                raise ValueError(
                    f"more global tokens than max_globals={G}: per-example counts {over} "
                    f"(example index: count)")

    # Masked slots are zeroed so NaN/inf written there reaches nothing
    # (0 * NaN would otherwise leak through matmuls and their gradients).
    keep = pad[:, :, None, None]
    qz, kz, vz = (jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    scale = 1.0 / math.sqrt(H)

    # ---- local part -------------------------------------------------------
    bq = block_q if block_q is not None else default_block_q(T, left, right)
    bq = V.check_positive_int(bq, "block_q")
    rb = None
    if random_blocks is not None:
        rb = V.check_random_blocks(random_blocks, block_size, B, N, T)
    elif block_size is not None:
        raise ValueError("block_size is only meaningful with random_blocks")

    nb = -(-T // bq)
    Tp = nb * bq
    nl, nr = -(-left // bq), -(-right // bq)
    kw = (nl + 1 + nr) * bq

    def pad_rows(x, rows):
        if rows == T:
            return x
        fill = False if x.dtype == jnp.bool_ else _BLOCK_PAD_FILL
        return jnp.pad(x, [(0, 0), (0, rows - T)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    q_loc = pad_rows(qz, Tp).reshape(B, nb, bq, N, H)
    k_slab = _shift_blocks(pad_rows(kz, Tp), nb, nl, nr, bq)  # [B, nb, kw, N, H]
    v_slab = _shift_blocks(pad_rows(vz, Tp), nb, nl, nr, bq)
    key_ok = _shift_blocks(pad_rows(pad, Tp), nb, nl, nr, bq)  # [B, nb, kw]
    # Relative offset j - i depends only on (row in block, column in slab).
    rel = (jnp.arange(kw)[None, :] - nl * bq) - jnp.arange(bq)[:, None]  # [bq, kw]
    win = (rel >= -left) & (rel <= right)
    row_ok = pad_rows(pad, Tp).reshape(B, nb, bq, 1)  # padded rows attend nothing
    m_loc = win[None, None] & key_ok[:, :, None, :] & row_ok  # [B, nb, bq, kw]
    m_loc = m_loc[:, None]  # [B, 1, nb, bq, kw]
    s_loc = jnp.einsum("bcqnh,bcknh->bncqk", q_loc, k_slab,
                       preferred_element_type=_F32) * scale
    s_loc = jnp.where(m_loc, s_loc, -jnp.inf)
    row_max = _row_stat(jnp.max(s_loc, axis=-1).reshape(B, N, Tp), T)  # [B, N, T]

    qpos = jnp.arange(T)
    # ---- global columns ---------------------------------------------------
    if G > 0:
        gpos, gvalid, gcount = gather_global_positions(glob, G)  # [B, G]
        bidx = jnp.arange(B)[:, None]
        k_g = kz[bidx, gpos]  # [B, G, N, H]
        v_g = vz[bidx, gpos]
        rel_g = gpos[:, None, :] - qpos[None, :, None]  # [B, T, G]
        in_win = (rel_g >= -left) & (rel_g <= right)
        m_gc = gvalid[:, None, :] & ~in_win & pad[:, :, None]
        if is_causal:
            m_gc = m_gc & (rel_g <= 0)
        m_gc = m_gc[:, None]  # [B, 1, T, G]
        s_gc = jnp.einsum("btnh,bgnh->bntg", qz, k_g, preferred_element_type=_F32) * scale
        s_gc = jnp.where(m_gc, s_gc, -jnp.inf)
        row_max = jnp.maximum(row_max, jnp.max(s_gc, axis=-1))

    # ---- random blocks ----------------------------------------------------
    if rb is not None:
        bs = block_size
        nbr = -(-T // bs)
        Tr = nbr * bs
        r = rb.shape[-1]
        rbb = jnp.broadcast_to(rb, (B, N, nbr, r))
        # A block drawn twice for the same query block counts once.
        dup = jnp.any(
            (rbb[..., :, None] == rbb[..., None, :])
            & (jnp.arange(r)[:, None] > jnp.arange(r)[None, :]), axis=-1)  # [B, N, nbr, r]
        kpos_r = rbb[..., None] * bs + jnp.arange(bs)  # [B, N, nbr, r, bs]
        kpos_r = kpos_r.reshape(B, N, nbr, r * bs)
        kpos_c = jnp.minimum(kpos_r, T - 1)
        bidx4 = jnp.arange(B)[:, None, None, None]
        nidx4 = jnp.arange(N)[None, :, None, None]
        k_r = kz[bidx4, kpos_c, nidx4]  # [B, N, nbr, r*bs, H]
        v_r = vz[bidx4, kpos_c, nidx4]
        ok_r = (kpos_r < T) & pad[bidx4, kpos_c] & ~jnp.repeat(dup, bs, axis=-1)
        if glob is not None:
            ok_r = ok_r & ~glob[bidx4, kpos_c]
        qpos_r = jnp.arange(Tr).reshape(nbr, bs)  # [nbr, bs]
        rel_r = kpos_r[:, :, :, None, :] - qpos_r[None, None, :, :, None]  # [B,N,nbr,bs,r*bs]
        row_ok_r = pad_rows(pad, Tr).reshape(B, 1, nbr, bs, 1)
        m_r = ok_r[:, :, :, None, :] & row_ok_r & ~((rel_r >= -left) & (rel_r <= right))
        if is_causal:
            m_r = m_r & (rel_r <= 0)
        q_r = pad_rows(qz, Tr).reshape(B, nbr, bs, N, H)
        s_r = jnp.einsum("bcqnh,bnckh->bncqk", q_r, k_r, preferred_element_type=_F32) * scale
        s_r = jnp.where(m_r, s_r, -jnp.inf)
        row_max = jnp.maximum(row_max, _row_stat(jnp.max(s_r, axis=-1).reshape(B, N, Tr), T))

    # ---- joint softmax ----------------------------------------------------
    if sinks is not None:
        row_max = jnp.maximum(row_max, sinks[None, :, None])
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    row_max = jax.lax.stop_gradient(row_max)  # any shift is exact; keep it out of autodiff

    m5 = _to_rows(row_max, Tp).reshape(B, N, nb, bq, 1)
    p_loc = jnp.where(m_loc, jnp.exp(s_loc - m5), 0.0)
    denom = _row_stat(jnp.sum(p_loc, axis=-1).reshape(B, N, Tp), T)
    o = jnp.einsum("bncqk,bcknh->bcqnh", p_loc.astype(v.dtype), v_slab,
                   preferred_element_type=_F32).reshape(B, Tp, N, H)[:, :T]
    if G > 0:
        p_gc = jnp.where(m_gc, jnp.exp(s_gc - row_max[..., None]), 0.0)
        denom = denom + jnp.sum(p_gc, axis=-1)
        o = o + jnp.einsum("bntg,bgnh->btnh", p_gc.astype(v.dtype), v_g,
                           preferred_element_type=_F32)
    if rb is not None:
        m5r = _to_rows(row_max, Tr).reshape(B, N, nbr, bs, 1)
        p_r = jnp.where(m_r, jnp.exp(s_r - m5r), 0.0)
        denom = denom + _row_stat(jnp.sum(p_r, axis=-1).reshape(B, N, Tr), T)
        o_r = jnp.einsum("bncqk,bnckh->bcqnh", p_r.astype(v.dtype), v_r,
                         preferred_element_type=_F32).reshape(B, Tr, N, H)[:, :T]
        o = o + o_r
    if sinks is not None:
        denom = denom + jnp.exp(sinks[None, :, None] - row_max)
    denom = jnp.where(denom > 0, denom, 1.0)
    out = o / jnp.transpose(denom, (0, 2, 1))[..., None]

    # ---- global rows: full attention for G rows, written over -------------
    if G > 0:
        if global_qkv is not None:
            qg_src, kg_src, vg_src = (jnp.where(keep, x, jnp.zeros((), x.dtype)) for x in global_qkv)
        else:
            qg_src, kg_src, vg_src = qz, kz, vz
        bidx = jnp.arange(B)[:, None]
        q_rows = qg_src[bidx, gpos]  # [B, G, N, H]
        s_gr = jnp.einsum("bgnh,bsnh->bngs", q_rows, kg_src, preferred_element_type=_F32) * scale
        m_gr = gvalid[:, :, None] & pad[:, None, :]  # [B, G, T]
        if is_causal:
            m_gr = m_gr & (qpos[None, None, :] <= gpos[:, :, None])
        m_gr = m_gr[:, None]
        s_gr = jnp.where(m_gr, s_gr, -jnp.inf)
        mx = jnp.max(s_gr, axis=-1)
        if sinks is not None:
            mx = jnp.maximum(mx, sinks[None, :, None])
        mx = jax.lax.stop_gradient(jnp.where(jnp.isfinite(mx), mx, 0.0))
        p_gr = jnp.where(m_gr, jnp.exp(s_gr - mx[..., None]), 0.0)
        den_g = jnp.sum(p_gr, axis=-1)
        if sinks is not None:
            den_g = den_g + jnp.exp(sinks[None, :, None] - mx)
        den_g = jnp.where(den_g > 0, den_g, 1.0)
        o_gr = jnp.einsum("bngs,bsnh->bgnh", p_gr.astype(vg_src.dtype), vg_src,
                          preferred_element_type=_F32)
        o_gr = o_gr / jnp.transpose(den_g, (0, 2, 1))[..., None]
        slot_pos = jnp.where(gvalid, gpos, T)  # T = out of range, dropped
        out = out.at[bidx, slot_pos].set(o_gr, mode="drop")
        # Over capacity inside jit: poison the example rather than truncate it.
        out = jnp.where((gcount > G)[:, None, None, None], jnp.nan, out)

    out = jnp.where(keep, out, 0.0)
    return out.astype(q.dtype)
