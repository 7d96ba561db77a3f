"""``implementation='pallas_tpu'``: fused global + local attention for TPU (Pallas / Mosaic).

Two passes of one block-sparse flash-attention primitive with its own VJP
(:func:`globalattn.kernels.pallas_tpu_kernels.attend`):

1. **Rows pass.** All T query rows against ``[K_globals ; K]``: the G global
   keys of each example gathered into ``ceil(G / block_k)`` dense key blocks in
   front of the sequence, so scattered globals cost a few blocks rather than a
   column of blocks each. Each query block visits the global blocks, its window
   band and the key blocks of its BigBird random blocks (a list computed from
   the grid indices, or with random blocks a scalar-prefetched one). Per-key
   codes exclude padding, empty global slots, global keys inside the window
   (already counted there) and global keys drawn by a random block;
   duplicated random draws count once because the pair mask is an OR.
2. **Global-rows pass.** The G global query rows (``q_g`` with ``global_qkv``)
   against every real key. It runs first: the rows pass's kernel writes its
   outputs at their rows (a row code makes global rows attend nothing there)
   with a one-hot matmul over the two blocks of slots a row block can hold, so
   no full-length copy is made to overwrite them.

Gradients meet the same way: the slots' dK / dV and the global rows' dQ are
folded into the sequence's dK / dV and dQ inside the kernels, and the rows
pass's dK / dV kernel adds the global-rows pass's in place.

Layout: a head dim that fills whole 128-lane tiles is read heads-first
``[B, N, T, H]`` (XLA:TPU lays such ``[B, T, N, H]`` arrays out that way
itself); a smaller one token-major ``[B, T, N * H]`` with two or more heads
side by side in one lane-dense block (heads-first would pad each row of 64 to
128 lanes). Padding and empty slots are zeroed inside the kernels, and the
backward's per-row ``do . out`` is computed by a kernel of its own, so no
full-length copy of an input is made around them; heads-first, dQ is written
over ``do``'s buffer (its last use). Heads-first, the global
slots' rows are gathered by a small Pallas kernel (XLA:TPU's gather would copy
the whole array into a layout with T outermost first) and the library's
non-finite-key rule (``core.non_finite_to_keys``) is applied to each key block
inside the kernels; token-major, the rule is applied before them, where XLA
fuses it into the layout change it makes anyway.

Softmax is online in float32 with a custom VJP whose backward kernels recompute
probabilities from the per-row log-sum-exp: nothing of size T x window lives in
HBM. On a backend other than TPU the same kernels run in Pallas interpret mode.

Cost per head: rows pass ``T * (G_blocks + window_blocks + random_blocks) *
block_k`` scores; global-rows pass ``G * T``.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
from jax import lax

from globalattn.kernels import pallas_tpu_schedule as S
from globalattn.kernels.pallas_tpu_kernels import (Config, Pass, Slots, SlotTable, attend,
                                                   gather_rows, heads_per_block, xla_take_rows)
from globalattn.ops import core
from globalattn.ops.dense import gather_global_positions

Array = jax.Array

__all__ = ["pallas_tpu_attention", "default_block", "compile_for_tpu"]

# Set by compile_for_tpu(): lower to Mosaic although the default backend is not a TPU.
_FORCE_MOSAIC = [False]


@contextlib.contextmanager
def compile_for_tpu() -> Iterator[None]:
    """Traces inside lower the kernel for TPU (Mosaic) from a host without one.

    For ahead-of-time compilation against ``jax.experimental.topologies``
    devices: ``implementation='auto'`` picks ``'pallas_tpu'`` (as on a TPU
    backend) and the kernel is not interpreted. Traces only: nothing inside
    may run on the host backend.
    """
    from globalattn.ops import global_local as gl  # the dispatcher's backend -> kernel table

    host = jax.default_backend()
    saved = gl.AUTO.get(host)
    gl.AUTO[host] = gl.AUTO["tpu"]
    _FORCE_MOSAIC[0] = True
    try:
        yield
    finally:
        _FORCE_MOSAIC[0] = False
        if saved is None:
            gl.AUTO.pop(host, None)
        else:
            gl.AUTO[host] = saved

_TPU_BLOCK = 128  # lane width: key blocks and the row statistics are lane-dense


def default_block(seq_len: int, on_tpu: bool) -> int:
    """Query and key block size: 128 on TPU; in interpret mode the sequence rounded up to 8, at most 128."""
    if on_tpu:
        return _TPU_BLOCK
    return min(_TPU_BLOCK, S.cdiv(seq_len, 8) * 8)


def _check_block(value: int, name: str, on_tpu: bool) -> int:
    unit = _TPU_BLOCK if on_tpu else 8
    if not isinstance(value, int) or value <= 0 or value % unit:
        raise ValueError(f"{name} must be a positive multiple of {unit}"
                         f"{' on TPU' if on_tpu else ''}, got {value!r}")
    return value


# Moving the G global rows in and out of the kernels' arrays. Autodiff
# of a gather gives a scatter-add, which XLA:TPU runs on 32-bit copies of the whole
# array; positions of valid globals are distinct, so both directions are gathers.
def _take_rows(x: Array, idx: Array, valid: Array, interpret: Any) -> Array:
    """:func:`xla_take_rows`, but a heads-first ``x [B, N, T, H]`` by the Pallas kernel
    :func:`gather_rows` (XLA:TPU would copy all of ``x`` into another layout first)."""
    if x.ndim == 4:  # the kernel writes zeros where the position is negative
        return gather_rows(x, jnp.where(valid, idx, -1), interpret=interpret)
    return xla_take_rows(x, idx, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gather_rows(x: Array, pos: Array, valid: Array, slot: Array, interpret: Any) -> Array:
    """``x[b, pos[b, g]]`` (:func:`_take_rows`), zero where ``valid [B, G]`` is False;
    ``slot [B, T]`` = the slot of each position or -1.

    Only slots named by ``slot`` receive gradient (an empty slot's row is a
    zero). Used for the global rows of ``global_qkv``'s queries (the rows
    pass's own slots are gathered for the kernel without a gradient: it folds
    theirs in).
    """
    return _take_rows(x, pos, valid, interpret)


def _gather_rows_fwd(x, pos, valid, slot, interpret):
    return _gather_rows(x, pos, valid, slot, interpret), (pos, slot)


def _gather_rows_bwd(interpret, res, ct):
    pos, slot = res
    # Every position takes its slot's row: a full-length result, XLA's own gather.
    return xla_take_rows(ct, jnp.maximum(slot, 0), slot >= 0), None, None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def pallas_tpu_attention(args, *, block_q: Optional[int] = None, block_k: Optional[int] = None,
                         interpret: Any = None) -> Array:
    """The ``'pallas_tpu'`` implementation: ``GlobalLocalArgs -> [B, T, N, H]``.

    ``block_q``/``block_k`` are static tiling knobs (the result does not depend
    on them); ``interpret`` defaults to False on TPU and True elsewhere, and may
    be a ``pltpu.InterpretParams``.

    Under a mesh with Auto axes (``jax.set_mesh``, as the training step runs)
    the kernel is placed in a ``jax.shard_map``: a Mosaic call cannot be
    partitioned by the compiler. Examples are split over the batch mesh axes
    and heads over ``'model'`` where they divide; other axes see the whole
    (replicated) operands.
    """
    kw = dict(block_q=block_q, block_k=block_k, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    # Every Auto axis, size 1 included: Mosaic lowers only where all axes are manual.
    auto = [] if mesh.empty else [
        name for name, kind in zip(mesh.axis_names, mesh.axis_types)
        if kind == jax.sharding.AxisType.Auto]
    if not auto:
        return _attention(args, **kw)
    return _sharded(args, mesh, auto, kw)


def _sharded(args, mesh, auto, kw) -> Array:
    from globalattn.sharding import BATCH_MESH_AXES  # batch is split over these axes

    from jax.sharding import PartitionSpec as P

    B, _, N, _ = args.q.shape
    batch, size = [], 1
    for name in auto:
        if name in BATCH_MESH_AXES and B % (size * mesh.shape[name]) == 0:
            batch.append(name)
            size *= mesh.shape[name]
    b = tuple(batch) or None
    h = "model" if "model" in auto and N % mesh.shape["model"] == 0 else None
    rb = args.random_blocks
    arrays = dict(q=args.q, k=args.k, v=args.v, padding_mask=args.padding_mask,
                  global_mask=args.global_mask, random_blocks=rb, global_qkv=args.global_qkv,
                  sinks=args.sinks)
    tok, bt = P(b, None, h, None), P(b, None)
    specs = dict(q=tok, k=tok, v=tok, padding_mask=bt, global_mask=bt,
                 random_blocks=None if rb is None else P(b if rb.shape[0] > 1 else None,
                                                         h if rb.shape[1] > 1 else None),
                 global_qkv=None if args.global_qkv is None else (tok,) * 3,
                 sinks=P(h))
    specs = {key: val for key, val in specs.items() if arrays[key] is not None}
    arrays = {key: val for key, val in arrays.items() if val is not None}

    def body(parts):
        return _attention(args._replace(**parts), **kw)
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=tok,
                         axis_names=set(auto))(arrays)


def _attention(args, *, block_q: Optional[int], block_k: Optional[int], interpret: Any) -> Array:
    q, k, v = args.q, args.k, args.v
    B, T, N, H = q.shape
    on_tpu = jax.default_backend() == "tpu" or _FORCE_MOSAIC[0]
    if interpret is None:
        interpret = not on_tpu
    strict = on_tpu and not interpret
    bq = _check_block(block_q if block_q is not None else default_block(T, strict), "block_q",
                      strict)
    bk = _check_block(block_k if block_k is not None else default_block(T, strict), "block_k",
                      strict)
    Tp = S.cdiv(T, math.lcm(bq, bk)) * math.lcm(bq, bk)
    nq, nks = Tp // bq, Tp // bk
    left, right, causal = args.left, args.right, args.is_causal
    # Layout: a head dim that fills whole lane tiles (128 on TPU) is read heads-first,
    # [B, N, T, H], the layout XLA:TPU gives such arrays itself; a smaller one token-
    # major, [B, T, N * H], with heads_per_block heads side by side in a lane-dense
    # block (their own layout; heads-first would pad every row to 128 lanes). In
    # interpret mode the lane unit is 8, so small test heads take both routes.
    lanes = _TPU_BLOCK if strict else 8
    heads_first = H % lanes == 0
    hb = 1 if heads_first else heads_per_block(N, H, lanes)
    Ng = N // hb

    pad = args.padding_mask
    pad_p = jnp.pad(pad, ((0, 0), (0, Tp - T)))

    def kernel_layout(x):  # [B, T, N, H] -> [B, N, Tp, H] or [B, Tp, N * H]
        if heads_first:
            x = jnp.transpose(x, (0, 2, 1, 3))
            return x if Tp == T else jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
        x = x.reshape(B, T, N * H)
        return x if Tp == T else jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0)))

    # The library's non-finite-key rule (core.non_finite_to_keys): heads-first, the
    # kernels apply it to each key block (no copies of k and v); token-major, here,
    # where XLA fuses it into the layout change it makes anyway (measured: fewer
    # temporaries than in the kernels, results/bench_tpu.md).
    rule_here = not heads_first
    global_qkv = args.global_qkv
    if rule_here:
        k, v, global_qkv = core.non_finite_to_keys_all(k, v, global_qkv)
    qt, kt, vt = kernel_layout(q), kernel_layout(k), kernel_layout(v)
    has_sinks = args.sinks is not None
    sinks = args.sinks if has_sinks else jnp.zeros((N,), jnp.float32)
    glob, G = args.global_mask, args.max_globals
    has_g = glob is not None and G > 0

    # ---- key slots of the rows pass: [global slots ; sequence] ----------
    seq_pos = jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (B, Tp))
    glob_p = (jnp.pad(glob, ((0, 0), (0, Tp - T))) if glob is not None
              else jnp.zeros((B, Tp), bool))
    seq_code = jnp.where(pad_p, jnp.where(glob_p, S.CODE_GLOBAL_TOKEN, S.CODE_TOKEN),
                         S.CODE_INVALID)
    rb = None
    seq_blk = None
    if args.random_blocks is not None:
        rb = S.random_ids(args.random_blocks, T, args.block_size)
        seq_blk = jnp.where(seq_pos < T, seq_pos // args.block_size, -1)
    seq_info = S.key_info(seq_pos, seq_code, seq_blk)  # [B, 3, Tp]

    ng = 0
    key_slots = None
    kinfo = seq_info
    slot_p = jnp.full((B, Tp), -1, jnp.int32)
    if has_g:
        gpos, gvalid, _ = gather_global_positions(glob, G)  # [B, G]
        ng = S.cdiv(G, bk)
        gpos_k = jnp.pad(gpos, ((0, 0), (0, ng * bk - G)))
        gvalid_k = jnp.pad(gvalid, ((0, 0), (0, ng * bk - G)))
        # The first G globals fill the slots in position order: slot_p[b, t] = the
        # slot of position t (its rank among the globals) or -1; before[b, t] = the
        # number of slots at positions before t. One cumsum gives both.
        rank = jnp.cumsum(glob_p, axis=1, dtype=jnp.int32) - 1  # [B, Tp]
        slot_p = jnp.where(glob_p & (rank < G), rank, -1)
        before = jnp.minimum(rank + 1 - glob_p.astype(jnp.int32), G)
        # The slots' K / V are gathered below without a gradient; the kernel adds
        # theirs back at these positions (slot_block: the slot block of each key
        # block's first global; positions ascend with the slot).

        def slot_table(pos, valid, seq_block, slot_block):
            return SlotTable(fold_pos=jnp.where(valid, pos, -1)[:, None, :],
                             slot_block=before[:, ::seq_block] // slot_block)

        key_slots = slot_table(gpos_k, gvalid_k, bk, bk)
        g_info = S.key_info(gpos_k, jnp.where(gvalid_k, S.CODE_GLOBAL_SLOT, S.CODE_INVALID),
                            None)
        kinfo = jnp.concatenate([g_info, seq_info], axis=2)

    # ---- schedule of the rows pass ---------------------------------------
    need_seq = S.band_need(nq, bq, nks, bk, left, right, T)[None, None]  # [1, 1, nq, nks]
    length = S.band_bound(bq, bk, left, right)
    t_length = S.band_bound(bk, bq, right, left)
    n_rand, info_heads = 0, 1
    # Row code: padding (2) and global rows (1) attend nothing in the rows pass (the
    # global-rows pass writes the latter), so their inputs and cotangents may hold anything.
    code = jnp.where(pad_p, (slot_p >= 0).astype(jnp.int32), 2)[:, None, None, :]  # [B,1,1,Tp]
    qinfo = code
    if rb is not None:
        n_rand = rb.shape[-1]
        rneed = S.random_need(rb, nq, bq, nks, bk, T, args.block_size)  # [B', N', nq, nks]
        if causal:
            rneed = rneed & S.causal_need(nq, bq, nks, bk)
        if rneed.shape[1] > 1:  # per-head draws: a head group visits the union of its heads'
            rneed = jnp.any(rneed.reshape(rneed.shape[0], Ng, hb, nq, nks), axis=2)
        need_seq = need_seq | rneed
        rand_rows = S.row_random_ids(rb, T, Tp, args.block_size)  # [B', N', r, Tp]
        per_head = rand_rows.shape[1] > 1
        info_heads = hb if per_head else 1
        lead = (B, rand_rows.shape[1])
        rows_info = jnp.concatenate([jnp.broadcast_to(code, lead + (1, Tp)),
                                     jnp.broadcast_to(rand_rows, lead + rand_rows.shape[2:])],
                                    axis=2)  # [B, N', 1 + r, Tp]: each head's rows together
        qinfo = rows_info.reshape(B, Ng, hb * (1 + n_rand), Tp) if per_head else rows_info
        length += S.random_bound(bq, bk, args.block_size, n_rand)
        t_length = nq  # any number of query blocks may draw one key block
    sched_bn = tuple(need_seq.shape[:2])
    # Every query block visits the ng global blocks (the capacity G is static; the
    # kernel masks empty slots). Causally, a global block is needed only when its
    # first position precedes the query block's end (positions ascend with the slot).
    gneed = None
    if has_g and causal:
        first = jnp.min(jnp.where(gvalid_k, gpos_k, Tp), axis=0)[::bk]  # [ng]
        gneed = first[None, :] <= jnp.arange(nq)[:, None] * bq + bq - 1
    length = min(ng + nks, ng + length)
    t_length = min(nq, t_length)
    # Lists that do not depend on the data (no random blocks; globals not causal) are
    # computed by the kernels from the grid indices (S.IntervalLists): no table.
    tsched = []  # transposed lists: the global slots' (every query block), the sequence's
    if rb is None and gneed is None:
        sched = (S.band_lists(nq, bq, bk, left, right, T, length, prefix=ng), None)
    else:
        need = need_seq
        if has_g:
            g = jnp.ones((nq, ng), bool) if gneed is None else gneed
            need = jnp.concatenate([jnp.broadcast_to(g, need_seq.shape[:2] + g.shape),
                                    jnp.broadcast_to(need_seq, need_seq.shape)], axis=-1)
        sched = S.lists_from_need(need, length)
    if has_g:
        tsched.append((S.full_lists(ng, bk, nq, nq), None) if gneed is None
                      else S.lists_from_need(
                          jnp.broadcast_to(gneed.T, need_seq.shape[:2] + (ng, nq)), nq))
    tsched.append((S.band_lists_t(nks, bq, bk, left, right, T, t_length), None)
                  if rb is None else S.lists_from_need(jnp.swapaxes(need_seq, -1, -2), t_length))
    cfg = Config(bq=bq, bk=bk, left=left, right=right, causal=causal, full_rows=False,
                 n_rand=n_rand, row_code=True, sched_bn=sched_bn,
                 info_bn=tuple(qinfo.shape[:2]), info_heads=info_heads,
                 has_sinks=has_sinks, n_global_blocks=ng, heads=hb, head_dim=H,
                 heads_first=heads_first, non_finite_rule=not rule_here,
                 interpret=interpret)
    rows = Pass(kinfo, qinfo, sched, tuple(tsched))

    def result(out):  # -> [B, T, N, H]
        if heads_first:
            return jnp.transpose(out[:, :, :T], (0, 2, 1, 3))
        return out[:, :T].reshape(B, T, N, H)

    if not has_g:
        return result(attend(cfg, None, qt, kt, vt, None, sinks, rows, None, None, (None,) * 3))

    # ---- global rows: G query rows against every real key -----------------
    bqg = min(bq, S.cdiv(G, 8) * 8)
    Gq = S.cdiv(G, bqg) * bqg
    nqg = Gq // bqg
    gpos_q = jnp.pad(gpos, ((0, 0), (0, Gq - G)))
    gvalid_q = jnp.pad(gvalid, ((0, 0), (0, Gq - G)))
    # Gq <= bq or blocks of bq slots: a query block's <= bq slots lie in two slot blocks.
    row_slots = slot_table(gpos_q, gvalid_q, bq, bqg)
    qkv_g = None  # None: q's own global rows (gathered below) against the rows pass's K / V
    if global_qkv is not None:
        qg_src, kg_src, vg_src = (kernel_layout(x) for x in global_qkv)
        qkv_g = (_gather_rows(qg_src, gpos_q, gvalid_q, slot_p, interpret), kg_src, vg_src)
    row_pos = jnp.where(gvalid_q, gpos_q, -1)
    qinfo_g = row_pos[:, None, None, :].astype(jnp.int32)  # [B, 1, 1, Gq]
    if causal:  # a block of global rows needs the key blocks up to its last row
        last = jnp.max(row_pos.reshape(B, nqg, bqg), axis=(0, 2))  # [nqg]
        need_g = (jnp.arange(nks)[None, :] * bk <= last[:, None]) & (jnp.arange(nks) * bk < T)
        need_g = need_g[None, None]
        g_sched = S.lists_from_need(need_g, nks)
        g_tsched = S.lists_from_need(jnp.swapaxes(need_g, -1, -2), nqg)
    else:  # every real key
        g_sched = (S.full_lists(nqg, bqg, S.cdiv(T, bk), nks), None)
        g_tsched = (S.full_lists(nks, bk, nqg, nqg, rows_below=T), None)
    cfg_g = Config(bq=bqg, bk=bk, left=left, right=right, causal=causal, full_rows=True,
                   n_rand=0, row_code=False, sched_bn=(1, 1), info_bn=(B, 1), info_heads=1,
                   has_sinks=has_sinks, n_global_blocks=0, heads=hb, head_dim=H,
                   heads_first=heads_first, non_finite_rule=not rule_here,
                   interpret=interpret)
    glob_pass = Pass(seq_info, qinfo_g, g_sched, (g_tsched,))
    # The slots' rows (zero in empty slots), gathered without a gradient of their own:
    # the kernel attributes it to q, k, v at their positions.
    take = lambda x, pos, valid: _take_rows(lax.stop_gradient(x), pos, valid, interpret)  # noqa: E731
    gathered = (None if qkv_g is not None else take(qt, gpos_q, gvalid_q),
                take(kt, gpos_k, gvalid_k), take(vt, gpos_k, gvalid_k))
    out = attend(cfg, cfg_g, qt, kt, vt, qkv_g, sinks, rows, glob_pass,
                 Slots(keys=key_slots, rows=row_slots), gathered)
    return result(out)
