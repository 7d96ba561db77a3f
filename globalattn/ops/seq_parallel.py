"""Sequence-parallel global + local attention: ``jax.shard_map`` over T.

Each of the P devices along mesh axis ``seq_axis`` holds a contiguous chunk of
C = T / P positions of q, k, v and the masks (device p holds ``[p*C, (p+1)*C)``).
Per call a device communicates only:

* halos -- the last ``left`` keys/values/padding flags of its chunk go to the
  right neighbour and the first ``right`` to the left neighbour (two
  ``ppermute``); ``left, right <= C``, so one hop suffices;
* the global buffer -- q, k, v and position of the G global tokens in the slot
  order of :func:`globalattn.gather_global_positions` (the first G globals by
  position): an all-gather of the per-shard counts (``[P, B]`` ints) gives each
  shard its slot offset, each shard scatters its own globals into a zero
  ``[B, G, ...]`` buffer and a ``psum`` assembles it;
* global-row statistics -- a global query sees the whole sequence, so every
  shard scores the G global queries against its own chunk and the partial
  softmaxes are combined exactly by log-sum-exp: ``pmax`` of the row max, then
  ``psum`` of the denominators ``[B, N, G]`` and weighted values ``[B, G, N, H]``.

None of these sizes involves T: communication is O(B*(left + right + G)*N*H)
per device per layer (see :func:`globalattn.sharding.comm_bytes_per_layer`).
Non-global rows are built from the same parts and joint softmax as the
single-device path (:mod:`globalattn.ops.core`: the blockwise local window
over ``[halo_left | chunk | halo_right]``, the global keys outside the
window, the sink), so the result equals it up to float rounding.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from globalattn.ops import chunked, core
from globalattn.ops import validate as V
from globalattn.ops.dense import Window
from globalattn.ops.global_local import CHUNK_ROWS, default_block_q

Array = jax.Array

__all__ = ["sequence_parallel_global_local_attention"]


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static configuration of one shard's computation."""
    axis: str
    P: int  # devices along the sequence axis
    C: int  # chunk length T / P
    left: int
    right: int
    G: int
    bq: int
    rows: int  # rows per chunk of the non-global rows
    causal: bool
    has_glob: bool
    has_sinks: bool
    has_gqkv: bool


def _exchange_halos(k: Array, v: Array, pad: Array, cfg: _Cfg) -> Tuple[Array, Array, Array]:
    """``[halo_left | chunk | halo_right]`` of k, v ``[B, N, C, H]`` and pad ``[B, C]``.

    Halos past the ends of the sequence arrive as zeros with pad False (a
    non-cyclic ppermute fills unreceived slots with zeros), so they are never
    attended.
    """
    C = cfg.C
    parts = [(k, v, pad)]
    if cfg.left:
        tail = (k[:, :, C - cfg.left:], v[:, :, C - cfg.left:], pad[:, C - cfg.left:])
        parts.insert(0, jax.lax.ppermute(tail, cfg.axis, [(i, i + 1) for i in range(cfg.P - 1)]))
    if cfg.right:
        head = (k[:, :, :cfg.right], v[:, :, :cfg.right], pad[:, :cfg.right])
        parts.append(jax.lax.ppermute(head, cfg.axis, [(i + 1, i) for i in range(cfg.P - 1)]))
    ks, vs, ms = zip(*parts)
    return (jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2),
            jnp.concatenate(ms, axis=1))


def _shard_attention(q: Array, k: Array, v: Array, pad: Array, *extra: Array, cfg: _Cfg) -> Array:
    """One device's rows. q, k, v: ``[B, C, N, H]``; pad, glob: ``[B, C]``.

    The same parts and joint softmax as the single-device ``'xla'`` path
    (:mod:`globalattn.ops.core`); this function only supplies the halos, the
    global buffer and the cross-device reductions of the global rows.
    """
    it = iter(extra)
    glob = next(it) if cfg.has_glob else None
    sinks = next(it) if cfg.has_sinks else None
    gqkv = (next(it), next(it), next(it)) if cfg.has_gqkv else None

    B, C, N, H = q.shape
    G, left, right = cfg.G, cfg.left, cfg.right
    scale = 1.0 / math.sqrt(H)
    base = jax.lax.axis_index(cfg.axis) * C  # global position of chunk row 0
    qpos = base + jnp.arange(C, dtype=jnp.int32)  # [C]
    qz, kz, vz = core.prepare(q, k, v, pad)  # [B, N, C, H]
    bidx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, C))

    # ---- global buffer: counts -> slots -> psum of per-shard scatters -----
    if cfg.has_glob:
        glob = glob & pad
        cnt = jnp.sum(glob, axis=-1, dtype=jnp.int32)  # [B]
        all_cnt = jax.lax.all_gather(cnt, cfg.axis)  # [P, B]
        shard = jnp.arange(cfg.P)[:, None]
        offset = jnp.sum(jnp.where(shard < jax.lax.axis_index(cfg.axis), all_cnt, 0), axis=0)
        total = jnp.sum(all_cnt, axis=0)  # [B], identical on every shard
    if G > 0:
        rank = offset[:, None] + jnp.cumsum(glob, axis=-1, dtype=jnp.int32) - 1
        slot = jnp.where(glob & (rank < G), rank, G)  # G = not in the buffer

        def scatter(x):  # [B, C, ...] -> this shard's slots of [B, G, ...]
            buf = jnp.zeros((B, G) + x.shape[2:], x.dtype)
            return buf.at[bidx, slot].set(x, mode="drop")

        def scatter_heads(x):  # [B, N, C, H] -> [B, N, G, H]
            return jnp.swapaxes(scatter(jnp.swapaxes(x, 1, 2)), 1, 2)

        if gqkv is not None:
            qg_src, kg_src, vg_src = core.prepare(*gqkv, pad)
        else:
            qg_src, kg_src, vg_src = qz, kz, vz
        # Each slot is filled by exactly one shard, so the sum is an assembly.
        gpos, k_g, v_g, q_rows = jax.lax.psum(
            (scatter(jnp.broadcast_to(qpos, (B, C))), scatter_heads(kz), scatter_heads(vz),
             scatter_heads(qg_src)), cfg.axis)
        gvalid = jnp.arange(G)[None, :] < total[:, None]  # [B, G]

    # ---- non-global rows: local window over [halo_left | chunk | halo_right]
    # and the global keys outside it, one joint softmax with the sink, in
    # chunks of cfg.rows rows as on one device ------------------------------
    k_ext, v_ext, pad_ext = _exchange_halos(kz, vz, pad, cfg)
    R = cfg.rows
    w = core.window_rows(qz, pad, k_ext, v_ext, pad_ext, rows=R, left=left, right=right,
                         block_q=cfg.bq, halo=(left, right))

    out = chunked.window_attention(w, scale=scale, n_rows=C, sinks=sinks,
                                   columns=(k_g, v_g, gpos, gvalid) if G > 0 else None,
                                   pos0=base, is_causal=cfg.causal)  # [B, N, C, H]
    out = jnp.swapaxes(out, 1, 2)  # [B, C, N, H]

    # ---- global rows: partial softmax per shard, combined by log-sum-exp --
    if G > 0:
        rows = core.global_row_part(q_rows, kg_src, vg_src, gpos, gvalid, qpos, pad,
                                    is_causal=cfg.causal, scale=scale)
        o_gr = core.joint_softmax([rows], G, sinks=sinks, axis_name=cfg.axis)  # [B, N, G, H]
        # Only the shard that owns a global row writes it.
        mine = gvalid & (gpos >= base) & (gpos < base + C)
        local_pos = jnp.where(mine, gpos - base, C)  # C = out of range, dropped
        out = out.at[jnp.arange(B)[:, None], local_pos].set(jnp.swapaxes(o_gr, 1, 2),
                                                             mode="drop")
    if cfg.has_glob:
        # Over capacity inside jit: poison the example rather than truncate it.
        out = jnp.where((total > G)[:, None, None, None], jnp.nan, out)

    out = jnp.where(pad[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


def _mesh_axis_size(mesh: Mesh, name: Optional[str], role: str) -> int:
    if name is None:
        return 1
    if name not in mesh.shape:
        raise ValueError(f"{role}={name!r} is not an axis of the mesh; mesh axes are "
                         f"{dict(mesh.shape)}")
    return int(mesh.shape[name])


def sequence_parallel_global_local_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mesh: Mesh,
    seq_axis: str = "seq",
    local_window_size: Window,
    global_mask: Optional[Array] = None,
    padding_mask: Optional[Array] = None,
    is_causal: bool = False,
    max_globals: Optional[int] = None,
    sinks: Optional[Array] = None,
    global_qkv: Optional[Tuple[Array, Array, Array]] = None,
    batch_axis: Optional[str] = None,
    head_axis: Optional[str] = None,
    block_q: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    random_blocks: Optional[Array] = None,
    block_size: Optional[int] = None,
) -> Array:
    """:func:`globalattn.global_local_attention` with T split across devices.

    Same semantics and result (up to float rounding) as the single-device
    kernel; see the module docstring for what is communicated. Works eagerly
    and under ``jax.jit``/``jax.grad``; the mesh may have Auto or Explicit axes.

    Args:
      q, k, v: ``[B, T, N, H]``; T is split along ``seq_axis`` in contiguous
        chunks of C = T / P (P = ``mesh.shape[seq_axis]``).
      mesh: the device mesh (see :func:`globalattn.sharding.make_mesh`).
      seq_axis: mesh axis that splits T.
      local_window_size: int w or (left, right) as in the kernel. After causal
        masking (right = 0) both sides must be at most C: halos come from the
        immediate neighbours only.
      global_mask, padding_mask: bool ``[B or 1, T]``, as in the kernel.
      is_causal: every pair, global ones included, needs ``j <= i``.
      max_globals: static capacity G. Required when ``global_mask`` is traced;
        when concrete and None, G is the largest per-example count. More than G
        globals: ValueError outside jit, NaN for that example inside jit.
      sinks: ``[N]`` per-head sink logits.
      global_qkv: ``(q_g, k_g, v_g)``, each ``[B, T, N, H]``, for global rows.
      batch_axis, head_axis: optional mesh axes that also split B and N (no
        communication along them).
      block_q: query-block size of the local part (tuning knob only).
      chunk_rows: rows per step of the loop over each device's rows, as in
        :func:`globalattn.global_local_attention` (tuning knob only).
      random_blocks, block_size: BigBird random blocks are not supported here
        (a random block may live on any device); passing them raises ValueError.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``, sharded as
      ``PartitionSpec(batch_axis, seq_axis, head_axis, None)``.
    """
    if random_blocks is not None or block_size is not None:
        raise ValueError(
            "random_blocks/block_size (BigBird random attention) are not supported by "
            "sequence_parallel_global_local_attention: a random key block can live on any "
            "device; use global_local_attention on one device instead")
    B, T, N, H = V.check_qkv(q, k, v)
    if k.shape[1] != T:
        raise ValueError(f"self-attention: k/v length {k.shape[1]} must equal q length {T}")
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    names = [n for n in (seq_axis, batch_axis, head_axis) if n is not None]
    if len(set(names)) != len(names):
        raise ValueError(f"seq_axis={seq_axis!r}, batch_axis={batch_axis!r} and "
                         f"head_axis={head_axis!r} must be distinct mesh axes")
    P = _mesh_axis_size(mesh, seq_axis, "seq_axis")
    PB = _mesh_axis_size(mesh, batch_axis, "batch_axis")
    PN = _mesh_axis_size(mesh, head_axis, "head_axis")
    if T % P:
        raise ValueError(f"sequence length T={T} is not divisible by the {P} devices of mesh "
                         f"axis seq_axis={seq_axis!r}")
    if B % PB:
        raise ValueError(f"batch B={B} is not divisible by the {PB} devices of mesh axis "
                         f"batch_axis={batch_axis!r}")
    if N % PN:
        raise ValueError(f"heads N={N} is not divisible by the {PN} devices of mesh axis "
                         f"head_axis={head_axis!r}")
    C = T // P
    left, right = V.normalize_window(local_window_size)
    if is_causal:
        right = 0
    left, right = min(left, T - 1), min(right, T - 1)  # beyond the sequence adds nothing
    if left > C or right > C:
        raise ValueError(
            f"local_window_size (left={left}, right={right}) is larger than the per-device "
            f"chunk T/P = {T}/{P} = {C}; halos come from the immediate neighbours only, so "
            f"use fewer devices along {seq_axis!r} or a smaller window")
    pad = V.check_token_mask(padding_mask, B, T, "padding_mask", default=True)
    sinks = V.check_sinks(sinks, N)
    V.check_global_qkv(global_qkv, q.shape)
    glob, G = V.resolve_globals(global_mask, pad, B, T, max_globals, padding_mask)

    bq = block_q if block_q is not None else default_block_q(C, left, right)
    bq = V.check_positive_int(bq, "block_q")
    rows = core.chunk_rows(C, bq, V.check_positive_int(
        chunk_rows if chunk_rows is not None else CHUNK_ROWS, "chunk_rows"))
    cfg = _Cfg(axis=seq_axis, P=P, C=C, left=left, right=right, G=G, bq=bq, rows=rows,
               causal=bool(is_causal), has_glob=glob is not None,
               has_sinks=sinks is not None, has_gqkv=global_qkv is not None and G > 0)

    x_spec = PartitionSpec(batch_axis, seq_axis, head_axis, None)
    m_spec = PartitionSpec(batch_axis, seq_axis)
    args, specs = [q, k, v, pad], [x_spec, x_spec, x_spec, m_spec]
    if cfg.has_glob:
        args += [glob]
        specs += [m_spec]
    if cfg.has_sinks:
        args += [sinks]
        specs += [PartitionSpec(head_axis)]
    if cfg.has_gqkv:
        args += list(global_qkv)
        specs += [x_spec] * 3

    def body(*a):
        return _shard_attention(*a, cfg=cfg)

    if any(t == AxisType.Explicit for t in mesh.axis_types):
        # Explicit axes make sharding part of the type and shard_map then
        # insists the arguments already carry in_specs (masks built here do
        # not); resharding is a no-op for inputs that already do.
        args = [jax.reshard(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    fn = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=x_spec)
    return fn(*args)
