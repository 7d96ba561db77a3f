""":func:`global_local_attention`: the public entry point and its implementations.

Arguments are validated and normalised once (:class:`GlobalLocalArgs`), then
``implementation=`` picks who computes: ``'xla'`` (below, pure JAX) or an
accelerator kernel registered in :mod:`globalattn.kernels`. Over-capacity
poisoning and padded rows are applied afterwards, the same for all.

The attention of one row i is a single softmax over the union of four key sets,
each counted once:

* local:  keys ``i - left <= j <= i + right`` -- computed blockwise: query
  block c (``block_q`` rows) scores a key slab of ``block_q + Lp + Rp`` keys,
  where Lp/Rp are left/right rounded up to multiples of ``block_q``;
* global columns: the G global keys outside i's window;
* random: the keys of i's BigBird random blocks not already counted;
* sink: an extra column with logit ``sinks[n]`` and value 0.

The four parts (:mod:`globalattn.ops.core`) share one row max and one
denominator (:func:`globalattn.ops.core.joint_softmax`), so the result equals
dense attention over the union exactly, up to float rounding.
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

from globalattn.kernels import APPLY_NON_FINITE_RULE, KERNELS
from globalattn.ops import chunked, core
from globalattn.ops import validate as V
from globalattn.ops.dense import Window, gather_global_positions

Array = jax.Array

__all__ = ["GlobalLocalArgs", "IMPLEMENTATIONS", "default_block_q", "global_local_attention"]


def default_block_q(seq_len: int, left: int, right: int) -> int:
    """Query block for the local part.

    Each row of a block scores ``block_q + Lp + Rp`` keys of which it needs
    ``left + right + 1``: small blocks waste fewer flops, large blocks give
    bigger matmuls. The block is the window rounded up to a power of two,
    clamped to [8, 128], and never much longer than the sequence; a chunk of
    the loop over rows (:data:`CHUNK_ROWS`) is then one block when the window
    is 128 or more, and its key slab is the chunk's key window itself (no
    copy). Measured on a 2-core CPU (window (256, 256), T = 8192, 64 globals,
    forward and gradients, medians of 15 in one process): block 128 in chunks
    of 128 rows 371-389 ms; block 256 in chunks of 256, 408-415 ms; block 128
    in chunks of 256, 428 ms; block 64 in chunks of 64, 413 ms. Window 512:
    chunks of 128 539 ms, of 256 569-655 ms; window 64: chunks of 128 300 ms,
    of 256 279 ms (pass ``chunk_rows=`` to tune).
    """
    w = max(left, right, 1)
    bq = min(128, max(8, 1 << (w - 1).bit_length()))
    return int(min(bq, max(8, 1 << (seq_len - 1).bit_length())))


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
    chunk_rows: Optional[int] = None,
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
        ``global_mask`` is traced; when it has a value (also a constant closed
        over under jit) and None, G is the largest per-example count. When an example has more than G globals: outside jit
        a ValueError naming the counts; inside jit that example's whole output
        is NaN (never silently truncated), so the loss shows it.
      random_blocks: int ``[B or 1, N or 1, ceil(T/block_size), r]`` key-block
        indices (see :func:`globalattn.random_block_indices`) in
        ``[0, ceil(T/block_size))``: outside that range a concrete array is a
        ValueError, and a traced index selects no block (as in
        :func:`globalattn.global_local_mask`).
      block_size: BigBird block size; required with ``random_blocks``.
      global_qkv: ``(q_g, k_g, v_g)``, each ``[B, T, N, H]``: global query rows
        use ``q_g`` against ``k_g``/``v_g`` of all tokens (Longformer).
      sinks: ``[N]`` per-head sink logits (extra column with value 0).
      block_q: static query-block size of the local part of the ``'xla'``
        implementation (a tuning knob; the result does not depend on it).
        Default :func:`default_block_q`.
      chunk_rows: rows per step of the ``'xla'`` implementation's loop over
        the rows (rounded down to whole query blocks, and BigBird blocks with
        ``random_blocks``; at least one); a tuning knob of speed and memory, the
        result does not depend on it. Default :data:`CHUNK_ROWS`.
      implementation: ``'auto'`` (default), or a name in :data:`IMPLEMENTATIONS`:
        ``'xla'`` is the pure JAX blockwise kernel. ``'auto'`` picks the fused
        kernel of the default backend when one is registered (see
        :data:`AUTO`), else ``'xla'``. Unknown names raise ValueError.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``. Non-finite inputs: NaN/inf in padded
      slots reaches nothing; a non-finite key or value of a real token makes
      exactly the rows that attend it NaN; a NaN sink logit makes its head NaN.
    """
    args = _resolve(q, k, v, local_window_size=local_window_size, global_mask=global_mask,
                    padding_mask=padding_mask, is_causal=is_causal, max_globals=max_globals,
                    random_blocks=random_blocks, block_size=block_size,
                    global_qkv=global_qkv, sinks=sinks)
    name = _implementation_name(implementation)
    if name == "xla":
        out = _xla_attention(args, block_q=block_q, chunk_rows=chunk_rows)
    else:
        for knob, value in (("block_q", block_q), ("chunk_rows", chunk_rows)):
            if value is not None:
                raise ValueError(f"{knob} tunes the 'xla' implementation only; got "
                                 f"{knob}={value} with implementation={name!r}")
        # Kernels see the same inputs as the XLA path's parts: a non-finite key
        # or value of a real token only reaches the rows that attend it.
        kernel_args = args
        if name not in APPLY_NON_FINITE_RULE:
            k, v, gqkv = core.non_finite_to_keys_all(args.k, args.v, args.global_qkv)
            kernel_args = args._replace(k=k, v=v, global_qkv=gqkv)
        out = _load(name)(kernel_args)
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
    glob, G = V.resolve_globals(global_mask, pad, B, T, max_globals, padding_mask)  # G static
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


# Rows per chunk of the 'xla' implementation (rounded to whole query blocks).
CHUNK_ROWS = 128


def _xla_attention(args: GlobalLocalArgs, *, block_q: Optional[int],
                   chunk_rows: Optional[int]) -> Array:
    """The pure JAX blockwise implementation (``implementation='xla'``).

    One joint softmax per row over the local part, the global columns outside
    the window, the random blocks and the sink (see :mod:`globalattn.ops.core`);
    global rows are G full rows written over the result.

    The rows go through in chunks of about ``chunk_rows`` (whole query
    blocks, and whole BigBird blocks with random blocks), one ``lax.map`` step
    each, with a hand-written backward (:mod:`globalattn.ops.chunked`): every
    chunk's scores stay small (cache-sized on a CPU); the forward keeps only
    each row's output and log normaliser, the backward recomputes a chunk's
    scores and forms the gradients from them (results/bench.md).
    """
    B, T, N, H = args.q.shape
    left, right, pad, glob, G = (args.left, args.right, args.padding_mask, args.global_mask,
                                 args.max_globals)
    causal = args.is_causal
    scale = 1.0 / math.sqrt(H)
    qt, kt, vt = core.prepare(args.q, args.k, args.v, pad)  # [B, N, T, H]
    bq = block_q if block_q is not None else default_block_q(T, left, right)
    bq = V.check_positive_int(bq, "block_q")
    chunk_rows = V.check_positive_int(chunk_rows if chunk_rows is not None else CHUNK_ROWS,
                                      "chunk_rows")
    rb, bs = args.random_blocks, args.block_size

    R = core.chunk_rows(T, bq if rb is None else math.lcm(bq, bs), chunk_rows)
    w = core.window_rows(qt, pad, kt, vt, pad, rows=R, left=left, right=right, block_q=bq)
    random = None
    if rb is not None:  # draws of the padding rows' blocks: -1 selects no block
        rb = jnp.pad(rb, ((0, 0), (0, 0), (0, w.q.shape[2] // bs - rb.shape[2]), (0, 0)),
                     constant_values=-1)
        random = (kt, vt, pad, glob, rb, bs)
    columns = None
    if G > 0:
        gpos, gvalid, _ = gather_global_positions(glob, G)  # [B, G]
        gidx = gpos[:, None, :, None]
        columns = (jnp.take_along_axis(kt, gidx, axis=2), jnp.take_along_axis(vt, gidx, axis=2),
                   gpos, gvalid)  # the global slots' keys and values [B, N, G, H]
    out = chunked.window_attention(w, scale=scale, n_rows=T, sinks=args.sinks, columns=columns,
                                   is_causal=causal, random=random)  # [B, N, T, H]
    out = jnp.transpose(out, (0, 2, 1, 3))  # [B, T, N, H]

    if G > 0:  # global rows: full attention for the G slots, written over
        qpos = jnp.arange(T)
        if args.global_qkv is not None:
            qg_t, kg_t, vg_t = core.prepare(*args.global_qkv, pad)
        else:
            qg_t, kg_t, vg_t = qt, kt, vt
        q_rows = jnp.take_along_axis(qg_t, gpos[:, None, :, None], axis=2)  # [B, N, G, H]
        rows = core.global_row_part(q_rows, kg_t, vg_t, gpos, gvalid, qpos, pad,
                                    is_causal=causal, scale=scale)
        o_gr = core.joint_softmax([rows], G, sinks=args.sinks)  # [B, N, G, H]
        slot_pos = jnp.where(gvalid, gpos, T)  # T = out of range, dropped
        out = out.at[jnp.arange(B)[:, None], slot_pos].set(
            jnp.transpose(o_gr, (0, 2, 1, 3)), mode="drop")
    return out
