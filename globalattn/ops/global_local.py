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

import importlib
import math
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from globalattn.kernels import KERNELS
from globalattn.ops import validate as V
from globalattn.ops.dense import Window, gather_global_positions

Array = jax.Array

__all__ = ["GlobalLocalArgs", "IMPLEMENTATIONS", "default_block_q", "global_local_attention"]

_F32 = jnp.float32
# Value written into internal block padding. Always 0 in use; tests set it to
# NaN to prove that padding never reaches an output or a gradient.
_BLOCK_PAD_FILL = 0.0


def default_block_q(seq_len: int, left: int, right: int) -> int:
    """Query block for the local part.

    Each row of a block scores ``block_q + Lp + Rp`` keys of which it needs
    ``left + right + 1``: small blocks waste fewer flops, large blocks give
    bigger matmuls and fewer slab copies. Measured on a 2-core CPU with window
    (256, 256), T=4096: block 128 beat 64 and 256 for forward+backward
    (experiments/bench.py). The block is the window rounded up to a power of
    two, clamped to [8, 128], and never much longer than the sequence.
    """
    w = max(left, right, 1)
    bq = min(128, max(8, 1 << (w - 1).bit_length()))
    return int(min(bq, max(8, 1 << (seq_len - 1).bit_length())))


def _pad_axis(x: Array, axis: int, before: int, after: int) -> Array:
    if before == 0 and after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    fill = False if x.dtype == jnp.bool_ else _BLOCK_PAD_FILL
    return jnp.pad(x, widths, constant_values=fill)


def _blocks(x: Array, axis: int, nb: int, bq: int) -> Array:
    """Pads ``axis`` to ``nb*bq`` and splits it into ``[nb, bq]``."""
    x = _pad_axis(x, axis, 0, nb * bq - x.shape[axis])
    return x.reshape(x.shape[:axis] + (nb, bq) + x.shape[axis + 1:])


def _slabs(x: Array, axis: int, nb: int, bq: int, n_left: int, n_right: int) -> Array:
    """Key slabs: for each of nb query blocks, ``n_left + 1 + n_right`` key blocks.

    ``x`` has the sequence on ``axis`` (any length <= nb*bq). Returns the
    sequence axis replaced by ``[nb, (n_left + 1 + n_right) * bq]``; slab c
    starts at key ``(c - n_left) * bq``. Out-of-range keys are padding.
    """
    x = _pad_axis(x, axis, n_left * bq, (nb + n_right) * bq - x.shape[axis])
    xb = x.reshape(x.shape[:axis] + (nb + n_left + n_right, bq) + x.shape[axis + 1:])
    parts = [jax.lax.slice_in_dim(xb, s, s + nb, axis=axis) for s in range(n_left + 1 + n_right)]
    return jnp.concatenate(parts, axis=axis + 1)


def _safe_max(m: Array) -> Array:
    """Row max for the exp shift: 0 for empty rows; out of autodiff (any shift is exact)."""
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


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
    implementation: str = "auto",
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
      block_q: static query-block size of the local part of the ``'xla'``
        implementation (a tuning knob; the result does not depend on it).
        Default :func:`default_block_q`.
      implementation: ``'auto'`` (default), or a name in :data:`IMPLEMENTATIONS`:
        ``'xla'`` is the pure JAX blockwise kernel. ``'auto'`` picks the fused
        kernel of the default backend when one is registered (see
        :data:`AUTO`), else ``'xla'``. Unknown names raise ValueError.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``.
    """
    args = _resolve(q, k, v, local_window_size=local_window_size, global_mask=global_mask,
                    padding_mask=padding_mask, is_causal=is_causal, max_globals=max_globals,
                    random_blocks=random_blocks, block_size=block_size,
                    global_qkv=global_qkv, sinks=sinks)
    name = _implementation_name(implementation)
    if name == "xla":
        out = _xla_attention(args, block_q=block_q)
    else:
        if block_q is not None:
            raise ValueError(f"block_q tunes the 'xla' implementation only; got block_q={block_q} "
                             f"with implementation={name!r}")
        out = _load(name)(args)
    return _finish(args, out)


class GlobalLocalArgs(NamedTuple):
    """The validated, normalised arguments every implementation receives.

    An implementation is ``fn(args: GlobalLocalArgs) -> [B, T, N, H]`` (dtype of
    ``q``) equal to the dense oracle on every non-padded row; padded rows and
    the over-capacity poisoning are applied afterwards by
    :func:`global_local_attention` for all implementations alike.
    """

    q: Array  # [B, T, N, H]
    k: Array  # [B, T, N, H]
    v: Array  # [B, T, N, H]
    left: int  # window: query i sees keys i - left .. i + right (clipped to T - 1;
    right: int  # right = 0 when causal)
    padding_mask: Array  # [B, T] bool, True = real token
    global_mask: Optional[Array]  # [B, T] bool with padding removed; None = no globals
    max_globals: int  # static capacity G (0 when global_mask is None)
    is_causal: bool
    random_blocks: Optional[Array]  # int32 [B or 1, N or 1, ceil(T / block_size), r]
    block_size: Optional[int]
    global_qkv: Optional[Tuple[Array, Array, Array]]  # each [B, T, N, H]
    sinks: Optional[Array]  # [N] float32


# name -> "module:function" of an implementation (None: the built-in XLA path).
# Accelerator kernels register in globalattn.kernels.KERNELS and are imported on first use.
IMPLEMENTATIONS: dict = {"xla": None, **KERNELS}
# Backend (jax.default_backend()) -> the implementation 'auto' picks there, if registered.
AUTO = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}


def _implementation_name(implementation: Any) -> str:
    if implementation == "auto":
        name = AUTO.get(jax.default_backend())
        return name if name in IMPLEMENTATIONS else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation={implementation!r}; known: "
                         f"{['auto'] + sorted(IMPLEMENTATIONS)}")
    return implementation


def _load(name: str) -> Callable[[GlobalLocalArgs], Array]:
    module, fn = IMPLEMENTATIONS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def _resolve(q, k, v, *, local_window_size, global_mask, padding_mask, is_causal, max_globals,
             random_blocks, block_size, global_qkv, sinks) -> GlobalLocalArgs:
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
    V.check_global_qkv(global_qkv, q.shape)
    glob, G = V.resolve_globals(global_mask, pad, B, T, max_globals)  # G static
    rb = None
    if random_blocks is not None:
        rb = V.check_random_blocks(random_blocks, block_size, B, N, T)
    elif block_size is not None:
        raise ValueError("block_size is only meaningful with random_blocks")
    return GlobalLocalArgs(q, k, v, left, right, pad, glob, G, bool(is_causal), rb,
                           block_size if rb is not None else None, global_qkv, sinks)


def _finish(args: GlobalLocalArgs, out: Array) -> Array:
    """Shared by every implementation: over capacity -> NaN example; padded rows -> 0."""
    if args.global_mask is not None:
        # Over capacity inside jit (outside jit it is a ValueError): poison the
        # example rather than silently truncate its globals.
        count = jnp.sum(args.global_mask, axis=-1)
        out = jnp.where((count > args.max_globals)[:, None, None, None], jnp.nan, out)
    out = jnp.where(args.padding_mask[:, :, None, None], out, jnp.zeros((), out.dtype))
    return out.astype(args.q.dtype)


def _xla_attention(args: GlobalLocalArgs, *, block_q: Optional[int]) -> Array:
    """The pure JAX blockwise implementation (``implementation='xla'``)."""
    q, k, v = args.q, args.k, args.v
    B, T, N, H = q.shape
    left, right, pad, glob, G = (args.left, args.right, args.padding_mask, args.global_mask,
                                 args.max_globals)
    is_causal, rb, block_size = args.is_causal, args.random_blocks, args.block_size
    global_qkv, sinks = args.global_qkv, args.sinks

    # Masked slots are zeroed so NaN/inf written there reaches nothing
    # (0 * NaN would otherwise leak through matmuls and their gradients).
    # Internally heads lead, [B, N, T, H], so every matmul is a plain batched
    # dot with no transposes inside the hot loop.
    keep = pad[:, :, None, None]

    def heads_first(x):
        return jnp.transpose(jnp.where(keep, x, jnp.zeros((), x.dtype)), (0, 2, 1, 3))

    qt, kt, vt = heads_first(q), heads_first(k), heads_first(v)
    scale = 1.0 / math.sqrt(H)

    # ---- local part -------------------------------------------------------
    bq = block_q if block_q is not None else default_block_q(T, left, right)
    bq = V.check_positive_int(bq, "block_q")
    nb = -(-T // bq)
    nl, nr = -(-left // bq), -(-right // bq)
    kw = (nl + 1 + nr) * bq
    key_ok = _slabs(pad, 1, nb, bq, nl, nr)  # [B, nb, kw]
    row_ok = _blocks(pad, 1, nb, bq)[..., None]  # [B, nb, bq, 1]; padded rows attend nothing
    # Block padding is zeroed through the masks, not trusted to be zero: a
    # masked entry contributes 0 * value to matmuls, which is NaN for NaN.
    zero = jnp.zeros((), q.dtype)
    q_loc = jnp.where(row_ok[:, None], _blocks(qt, 2, nb, bq), zero)  # [B, N, nb, bq, H]
    k_slab = jnp.where(key_ok[:, None, :, :, None], _slabs(kt, 2, nb, bq, nl, nr), zero)
    v_slab = jnp.where(key_ok[:, None, :, :, None], _slabs(vt, 2, nb, bq, nl, nr), zero)
    # Relative offset j - i depends only on (row in block, column in slab).
    rel = (jnp.arange(kw)[None, :] - nl * bq) - jnp.arange(bq)[:, None]  # [bq, kw]
    win = (rel >= -left) & (rel <= right)
    m_loc = (win[None, None] & key_ok[:, :, None, :] & row_ok)[:, None]  # [B, 1, nb, bq, kw]
    s_loc = jnp.einsum("bncqh,bnckh->bncqk", q_loc, k_slab, preferred_element_type=_F32) * scale
    s_loc = jnp.where(m_loc, s_loc, -jnp.inf)
    row_max = jnp.max(s_loc, axis=-1).reshape(B, N, nb * bq)[..., :T]  # [B, N, T]

    qpos = jnp.arange(T)
    # ---- global columns ---------------------------------------------------
    if G > 0:
        gpos, gvalid, gcount = gather_global_positions(glob, G)  # [B, G]
        gidx = gpos[:, None, :, None]
        k_g = jnp.take_along_axis(kt, gidx, axis=2)  # [B, N, G, H]
        v_g = jnp.take_along_axis(vt, gidx, axis=2)
        rel_g = gpos[:, None, :] - qpos[None, :, None]  # [B, T, G]
        m_gc = gvalid[:, None, :] & ~((rel_g >= -left) & (rel_g <= right)) & pad[:, :, None]
        if is_causal:
            m_gc = m_gc & (rel_g <= 0)
        m_gc = m_gc[:, None]  # [B, 1, T, G]
        s_gc = jnp.einsum("bnth,bngh->bntg", qt, k_g, preferred_element_type=_F32) * scale
        s_gc = jnp.where(m_gc, s_gc, -jnp.inf)
        row_max = jnp.maximum(row_max, jnp.max(s_gc, axis=-1))

    # ---- random blocks ----------------------------------------------------
    if rb is not None:
        bs = block_size
        nbr = -(-T // bs)
        r = rb.shape[-1]
        rbb = jnp.broadcast_to(rb, (B, N, nbr, r))
        # A block drawn twice for the same query block counts once.
        dup = jnp.any(
            (rbb[..., :, None] == rbb[..., None, :])
            & (jnp.arange(r)[:, None] > jnp.arange(r)[None, :]), axis=-1)  # [B, N, nbr, r]
        kpos_r = (rbb[..., None] * bs + jnp.arange(bs)).reshape(B, N, nbr, r * bs)
        kpos_c = jnp.minimum(kpos_r, T - 1)
        bidx4 = jnp.arange(B)[:, None, None, None]
        nidx4 = jnp.arange(N)[None, :, None, None]
        k_r = kt[bidx4, nidx4, kpos_c]  # [B, N, nbr, r*bs, H]
        v_r = vt[bidx4, nidx4, kpos_c]
        ok_r = (kpos_r < T) & pad[bidx4, kpos_c] & ~jnp.repeat(dup, bs, axis=-1)
        if glob is not None:
            ok_r = ok_r & ~glob[bidx4, kpos_c]
        qpos_r = jnp.arange(nbr * bs).reshape(nbr, bs)
        rel_r = kpos_r[:, :, :, None, :] - qpos_r[None, None, :, :, None]  # [B, N, nbr, bs, r*bs]
        row_ok_r = _blocks(pad, 1, nbr, bs)[:, None, :, :, None]
        m_r = ok_r[:, :, :, None, :] & row_ok_r & ~((rel_r >= -left) & (rel_r <= right))
        if is_causal:
            m_r = m_r & (rel_r <= 0)
        q_r = jnp.where(row_ok_r[..., 0, None], _blocks(qt, 2, nbr, bs), zero)  # [B, N, nbr, bs, H]
        s_r = jnp.einsum("bncqh,bnckh->bncqk", q_r, k_r, preferred_element_type=_F32) * scale
        s_r = jnp.where(m_r, s_r, -jnp.inf)
        row_max = jnp.maximum(row_max, jnp.max(s_r, axis=-1).reshape(B, N, nbr * bs)[..., :T])

    # ---- joint softmax ----------------------------------------------------
    if sinks is not None:
        row_max = jnp.maximum(row_max, sinks[None, :, None])
    row_max = _safe_max(row_max)

    p_loc = jnp.where(m_loc, jnp.exp(s_loc - _blocks(row_max, 2, nb, bq)[..., None]), 0.0)
    denom = jnp.sum(p_loc, axis=-1).reshape(B, N, nb * bq)[..., :T]
    o = jnp.einsum("bncqk,bnckh->bncqh", p_loc.astype(v.dtype), v_slab,
                   preferred_element_type=_F32).reshape(B, N, nb * bq, H)[:, :, :T]
    if G > 0:
        p_gc = jnp.where(m_gc, jnp.exp(s_gc - row_max[..., None]), 0.0)
        denom = denom + jnp.sum(p_gc, axis=-1)
        o = o + jnp.einsum("bntg,bngh->bnth", p_gc.astype(v.dtype), v_g,
                           preferred_element_type=_F32)
    if rb is not None:
        p_r = jnp.where(m_r, jnp.exp(s_r - _blocks(row_max, 2, nbr, bs)[..., None]), 0.0)
        denom = denom + jnp.sum(p_r, axis=-1).reshape(B, N, nbr * bs)[..., :T]
        o = o + jnp.einsum("bncqk,bnckh->bncqh", p_r.astype(v.dtype), v_r,
                           preferred_element_type=_F32).reshape(B, N, nbr * bs, H)[:, :, :T]
    if sinks is not None:
        denom = denom + jnp.exp(sinks[None, :, None] - row_max)
    denom = jnp.where(denom > 0, denom, 1.0)
    out = jnp.transpose(o / denom[..., None], (0, 2, 1, 3))  # [B, T, N, H]

    # ---- global rows: full attention for G rows, written over -------------
    if G > 0:
        if global_qkv is not None:
            qg_t, kg_t, vg_t = (heads_first(x) for x in global_qkv)
        else:
            qg_t, kg_t, vg_t = qt, kt, vt
        q_rows = jnp.take_along_axis(qg_t, gpos[:, None, :, None], axis=2)  # [B, N, G, H]
        s_gr = jnp.einsum("bngh,bnsh->bngs", q_rows, kg_t, preferred_element_type=_F32) * scale
        m_gr = gvalid[:, :, None] & pad[:, None, :]  # [B, G, T]
        if is_causal:
            m_gr = m_gr & (qpos[None, None, :] <= gpos[:, :, None])
        m_gr = m_gr[:, None]
        s_gr = jnp.where(m_gr, s_gr, -jnp.inf)
        mx = jnp.max(s_gr, axis=-1)
        if sinks is not None:
            mx = jnp.maximum(mx, sinks[None, :, None])
        mx = _safe_max(mx)
        p_gr = jnp.where(m_gr, jnp.exp(s_gr - mx[..., None]), 0.0)
        den_g = jnp.sum(p_gr, axis=-1)
        if sinks is not None:
            den_g = den_g + jnp.exp(sinks[None, :, None] - mx)
        den_g = jnp.where(den_g > 0, den_g, 1.0)
        o_gr = jnp.einsum("bngs,bnsh->bngh", p_gr.astype(vg_t.dtype), vg_t,
                          preferred_element_type=_F32) / den_g[..., None]
        slot_pos = jnp.where(gvalid, gpos, T)  # T = out of range, dropped
        out = out.at[jnp.arange(B)[:, None], slot_pos].set(
            jnp.transpose(o_gr, (0, 2, 1, 3)), mode="drop")
    return out
