"""``implementation='pallas_gpu'``: fused flash-style Pallas kernels for CUDA GPUs.

Same semantics as :func:`globalattn.global_local_attention` (and its dense
oracle :func:`globalattn.global_local_reference`): local window, per-example
global tokens in a static capacity G, global rows, padding, causal (global
pairs too need ``j <= i``), sinks, ``global_qkv``, BigBird random blocks,
bf16/f32 inputs with a float32 softmax; nothing of size T x T is formed.

How the work is split (each part a Pallas kernel with a hand-written backward
under one ``jax.custom_vjp``):

* ordinary rows (:mod:`~globalattn.kernels.pallas_gpu_local`): one program per
  query block loops over its window's key tiles, then over the G global keys
  (gathered into dense ``[Gp, H]`` tiles, so a few scattered globals cost one
  tile, not one key block each), then over its random blocks' keys (gathered
  likewise), with one online softmax; the sink joins at the end;
* global rows (:mod:`~globalattn.kernels.pallas_gpu_rows`): G full-length rows,
  split over key spans and merged (flash-decoding), written over the rows of
  the first part. Gathers and scatters stay in plain JAX, so JAX's autodiff
  routes the gradients of gathered keys and rows back to their positions.

Backend choice: Triton, via ``compiler_params=pallas.triton.CompilerParams``.
In the installed jax 0.10.2 a ``pallas_call`` without compiler params lowers
to Mosaic GPU (``jax_pallas_use_mosaic_gpu`` defaults to True), and with
Triton params to the ``__gpu$xla.gpu.triton`` custom call. We take Triton
because:

1. Correctness is checked here, on a CPU, in interpret mode: Triton-style
   kernels (BlockSpecs, plain array ops) run whole -- every grid program --
   in Pallas's generic interpreter, so the oracle tests exercise the very
   kernel bodies that run on a GPU. Mosaic GPU kernels are written in a
   different model (warpgroup semantics, explicit SMEM/TMA copies and
   barriers); its interpreter (``InterpretGPUParams``) runs a single grid
   block, and jax 0.10.2 already warns that ``pl.pallas_call`` for Mosaic
   GPU is deprecated in favour of ``plgpu.kernel``.
2. The Triton lowering (jaxpr -> Triton IR) runs at ``jax.export`` time on
   this CPU (it only needs a compute capability, defaulting to sm_90), so an
   unsupported op or shape fails in a CPU test rather than on a cluster;
   PTX compilation happens in XLA on the GPU (shared-memory limits and
   register pressure show only there, in the prepared device check).
3. Triton's dot lowers to wgmma on Hopper. The costs of this choice: no
   TMA or warp specialisation (Mosaic GPU's edge for dense attention), and
   the Pallas changelog deprecates the Triton backend as of jax 0.11.0 (to
   be removed later; jax 0.10.2 itself warns nothing). Moving to Mosaic GPU
   means rewriting the kernel bodies in :mod:`pallas_gpu_local` and
   :mod:`pallas_gpu_rows`; the tiling, the glue here and the tests carry over.

On a backend other than a GPU the same call runs in Pallas interpret mode.

Speed on a GPU has not been measured yet: ``python -m experiments.bench_gpu``
is the prepared device check (oracle check, then timings against the XLA
path and cuDNN); :class:`BlockConfig` holds the tile sizes it may tune.

Cost: ordinary rows O(T * (bq + left + right + G + r * block_size)) per head,
global rows O(G * T); memory O(T * (1 + r)) per head (random keys gathered).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from globalattn.kernels import pallas_gpu_local as local
from globalattn.kernels import pallas_gpu_rows as grows
from globalattn.kernels.pallas_gpu_tiles import LOG2E, NEG_INF, Plan
from globalattn.ops import validate as V
from globalattn.ops.dense import gather_global_positions
from globalattn.ops.global_local import GlobalLocalArgs

__all__ = ["BlockConfig", "attention", "pallas_gpu_attention"]

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile sizes (powers of two >= 16; clipped to the problem) and Triton knobs.

    The defaults follow the usual Hopper flash-attention shapes (128-row
    forward blocks, 64-key tiles); the result does not depend on them.
    ``split`` is how many sequence blocks one program of the G-sized kernels
    (global rows, global-key gradients) covers.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    block_g: int = 64
    block_r: int = 64
    split: int = 32
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None  # None: Triton's default (3 on CUDA)

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_g", "block_r"):
            x = getattr(self, f)
            if not isinstance(x, int) or x < 16 or x & (x - 1):
                raise ValueError(f"BlockConfig.{f} must be a power of two >= 16, got {x!r}")
        V.check_positive_int(self.split, "BlockConfig.split")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def make_plan(args: GlobalLocalArgs, config: BlockConfig, interpret: bool) -> Plan:
    """The static tiling of one call."""
    B, T, N, H = args.q.shape
    cap = max(16, _pow2(T))  # no block longer than the sequence needs
    bq, bk, bqb, bkb = (min(b, cap) for b in (config.block_q, config.block_k,
                                              config.block_q_bwd, config.block_k_bwd))
    G = args.max_globals if args.global_mask is not None else 0
    bg = min(config.block_g, max(16, _pow2(G)))
    rbs = args.block_size if args.random_blocks is not None else 0
    r = args.random_blocks.shape[-1] if rbs else 0
    rt = min(config.block_r, max(16, _pow2(rbs))) if rbs else 0
    # Random-block row loads start at any multiple of rbs: leave rbs + bqb rows of slack.
    slack = rbs + bqb if rbs else 0
    Tp = _round_up(T + slack, max(bq, bk, bqb, bkb))
    return Plan(B=B, T=T, N=N, H=H, Tp=Tp, Hp=max(16, _pow2(H)), left=args.left,
                right=args.right, causal=args.is_causal, scale2=LOG2E / math.sqrt(H),
                bq=bq, bk=bk, bqb=bqb, bkb=bkb, has_sink=args.sinks is not None,
                G=G, Gp=_round_up(G, bg) if G else 0, bg=bg, split=config.split,
                rbs=rbs, r=r, nrt=-(-rbs // rt) if rbs else 0, rt=rt,
                interpret=interpret, num_warps=config.num_warps, num_stages=config.num_stages)


# ---------------------------------------------------------------------------
# Ordinary rows: custom VJP around the local kernels.
# ---------------------------------------------------------------------------
def _sink_rows(p: Plan, sinks, n: int):
    return jnp.broadcast_to((sinks * LOG2E)[:, None], (p.N, n)).astype(_F32)


def _dsink(sinks, lse, delta, axis):
    """d loss / d sink = -sum_rows p_sink * delta (the sink's value vector is 0)."""
    p_sink = jnp.exp2(sinks[None, :, None] * LOG2E - lse)
    return -jnp.sum(p_sink * delta, axis=axis)


def _delta(out, do):
    """rowsum(out * dout), ``[B, N, rows]`` float32, from ``[B, rows, N, Hp]``."""
    return jnp.transpose(jnp.sum(out.astype(_F32) * do.astype(_F32), axis=-1), (0, 2, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _local_core(p, q, k, v, kbias, extras, sinks):
    return _local_fwd(p, q, k, v, kbias, extras, sinks)[0]


def _local_fwd(p, q, k, v, kbias, extras, sinks):
    sink2 = _sink_rows(p, sinks, p.bq) if p.has_sink else None
    out, lse = local.local_forward(p, q, k, v, kbias, extras, sink2)
    return out, (q, k, v, kbias, extras, sinks, out, lse)


def _local_bwd(p, res, do):
    q, k, v, kbias, extras, sinks, out, lse = res
    delta = _delta(out, do)
    dq = local.local_dq(p, q, k, v, kbias, do, lse, delta, extras)
    dk, dv = local.local_dkv(p, q, k, v, kbias, do, lse, delta)
    d_extras = []
    rest = list(extras)
    if p.G:
        kg, vg, gpos = rest[:3]
        rest = rest[3:]
        dkg, dvg = local.global_column_dkv(p, q, do, lse, delta, kg, vg, gpos)
        d_extras += [dkg.astype(kg.dtype), dvg.astype(vg.dtype), None]
    if p.rbs:
        kr, vr, rpos = rest
        dkr, dvr = local.random_dkv(p, q, do, lse, delta, kr, vr, rpos)
        d_extras += [dkr, dvr, None]
    dsinks = _dsink(sinks, lse, delta, (0, 2)) if p.has_sink else None
    return dq, dk, dv, None, tuple(d_extras), dsinks


_local_core.defvjp(_local_fwd, _local_bwd)


# ---------------------------------------------------------------------------
# Global rows: custom VJP around the row kernels.
# ---------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _rows_core(p, q_rows, k, v, kbias, gpos, sinks):
    return _rows_fwd(p, q_rows, k, v, kbias, gpos, sinks)[0]


def _rows_fwd(p, q_rows, k, v, kbias, gpos, sinks):
    acc, m, l = grows.rows_forward(p, q_rows, k, v, kbias, gpos)
    out, lse = grows.merge_spans(acc, m, l, sinks * LOG2E if p.has_sink else None)
    out = out.astype(q_rows.dtype)
    return out, (q_rows, k, v, kbias, gpos, sinks, out, lse)


def _rows_bwd(p, res, do):
    q_rows, k, v, kbias, gpos, sinks, out, lse = res
    delta = _delta(out, do)
    dq = grows.rows_dq(p, q_rows, k, v, kbias, gpos, do, lse, delta).astype(q_rows.dtype)
    dk, dv = grows.rows_dkv(p, q_rows, k, v, kbias, gpos, do, lse, delta)
    dsinks = _dsink(sinks, lse, delta, (0, 2)) if p.has_sink else None
    return dq, dk, dv, None, None, dsinks


_rows_core.defvjp(_rows_fwd, _rows_bwd)


# ---------------------------------------------------------------------------
# Gathers (plain JAX: their autodiff scatters gradients back).
# ---------------------------------------------------------------------------
def _gather_rows(x: Array, pos: Array) -> Array:
    """``x[b, pos[b, s]]`` -> ``[B, S, N, Hp]``; 0 where ``pos < 0``."""
    g = jnp.take_along_axis(x, jnp.maximum(pos, 0)[:, :, None, None], axis=1)
    return jnp.where((pos >= 0)[:, :, None, None], g, jnp.zeros((), x.dtype))


def _random_keys(p: Plan, args: GlobalLocalArgs, kz: Array, vz: Array):
    """Gathered random-block keys/values ``[B, S, N, Hp]`` and positions ``rpos [B, N, S]``.

    Slot layout: for BigBird query block c, random pick i, key tile u: slots
    ``((c * r + i) * nrt + u) * rt + [0, rt)``. A slot's position is -1 when
    the block index is out of range (under jit nothing is selected), the pick
    repeats an earlier pick of the same query block (a pair counts once), the
    key is past T, padding, or global (the global columns count it).
    """
    B, T, N = p.B, p.T, p.N
    rb = args.random_blocks  # [B or 1, N or 1, nbr, r]
    nbr, bs = p.nbr, p.rbs
    in_range = (rb >= 0) & (rb < nbr)
    tri = jnp.arange(p.r)[:, None] > jnp.arange(p.r)[None, :]
    dup = jnp.any((rb[..., :, None] == rb[..., None, :]) & tri, axis=-1)
    off = jnp.arange(p.nrt * p.rt)
    kpos = rb[..., None] * bs + off  # [B', N', nbr, r, nrt*rt]
    ok = (in_range & ~dup)[..., None] & (off < bs) & (kpos < T)
    kpos = jnp.broadcast_to(kpos, (B, N) + kpos.shape[2:]).reshape(B, N, -1)
    ok = jnp.broadcast_to(ok, (B, N) + ok.shape[2:]).reshape(B, N, -1)
    kc = jnp.clip(kpos, 0, T - 1)
    bidx = jnp.arange(B)[:, None, None]
    ok = ok & args.padding_mask[bidx, kc]
    if args.global_mask is not None:
        ok = ok & ~args.global_mask[bidx, kc]
    rpos = jnp.where(ok, kpos, -1).astype(jnp.int32)
    nidx = jnp.arange(N)[None, None, :]
    kc_t = jnp.transpose(kc, (0, 2, 1))  # [B, S, N]
    keep = jnp.transpose(ok, (0, 2, 1))[..., None]
    kr = jnp.where(keep, kz[bidx, kc_t, nidx], jnp.zeros((), kz.dtype))
    vr = jnp.where(keep, vz[bidx, kc_t, nidx], jnp.zeros((), vz.dtype))
    return kr, vr, rpos


# ---------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------
def pallas_gpu_attention(args: GlobalLocalArgs, *, config: Optional[BlockConfig] = None,
                         interpret: Optional[bool] = None) -> Array:
    """Global + local attention with the Pallas GPU kernels.

    Args:
      args: validated arguments (see :class:`globalattn.ops.global_local.GlobalLocalArgs`).
      config: tile sizes; default :class:`BlockConfig`.
      interpret: run the kernels in Pallas interpret mode; default: unless the
        default backend is a GPU.

    Returns:
      ``[B, T, N, H]`` in ``q.dtype``, equal to the oracle on every non-padded
      row (padded rows and over-capacity poisoning are applied by the caller).
    """
    config = config or BlockConfig()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    p = make_plan(args, config, bool(interpret))
    B, T, N, H = args.q.shape
    keep = args.padding_mask[:, :, None, None]

    def prep(x):
        # Masked slots are zeroed: NaN/inf written there must reach nothing
        # (0 * NaN in a matmul or its transpose would). Then pad to tiles.
        x = jnp.where(keep, x, jnp.zeros((), x.dtype))
        return jnp.pad(x, ((0, 0), (0, p.Tp - T), (0, 0), (0, p.Hp - H)))

    qz, kz, vz = prep(args.q), prep(args.k), prep(args.v)
    kbias = jnp.where(jnp.pad(args.padding_mask, ((0, 0), (0, p.Tp - T))), 0.0, NEG_INF)
    kbias = kbias.astype(_F32)
    extras = ()
    gpos = None
    if p.G:
        pos, valid, _ = gather_global_positions(args.global_mask, p.G)
        gpos = jnp.pad(jnp.where(valid, pos, -1), ((0, 0), (0, p.Gp - p.G)), constant_values=-1)
        extras += (_gather_rows(kz, gpos), _gather_rows(vz, gpos), gpos)
    if p.rbs:
        extras += _random_keys(p, args, kz, vz)
    out = _local_core(p, qz, kz, vz, kbias, extras, args.sinks)[:, :T, :, :H]
    if p.G:
        if args.global_qkv is not None:
            qg, kg, vg = (prep(x) for x in args.global_qkv)
        else:
            qg, kg, vg = qz, kz, vz
        rows = _rows_core(p, _gather_rows(qg, gpos), kg, vg, kbias, gpos, args.sinks)
        slot = jnp.where(gpos >= 0, gpos, T)  # T = out of range: dropped
        out = out.at[jnp.arange(B)[:, None], slot].set(rows[..., :H], mode="drop")
    return out


_ATTENTION_KWARGS = dict(local_window_size=None, global_mask=None, padding_mask=None,
                         is_causal=False, max_globals=None, random_blocks=None, block_size=None,
                         global_qkv=None, sinks=None)


def attention(q: Array, k: Array, v: Array, *, config: Optional[BlockConfig] = None,
              interpret: Optional[bool] = None, **kwargs) -> Array:
    """``global_local_attention(q, k, v, **kwargs, implementation='pallas_gpu')``
    with explicit tiles and interpret flag (for tuning, benchmarks and lowering tests).

    ``kwargs`` are those of :func:`globalattn.global_local_attention` except
    ``block_q`` and ``implementation``.
    """
    from globalattn.ops import global_local as gl  # the dispatcher imports this module lazily

    unknown = sorted(set(kwargs) - set(_ATTENTION_KWARGS))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(_ATTENTION_KWARGS)}")
    args = gl._resolve(q, k, v, **{**_ATTENTION_KWARGS, **kwargs})
    return gl._finish(args, pallas_gpu_attention(args, config=config, interpret=interpret))
