"""Device meshes and sequence-parallel attention.

* :func:`make_mesh` -- a named device mesh with Auto axes (why: see its docstring).
* :func:`sequence_parallel_global_local_attention` -- global + local attention
  with T split across devices (defined in :mod:`globalattn.seq_parallel`).
* :func:`comm_bytes_per_layer` -- per-device bytes that scheme communicates,
  next to a ring (all-to-all K/V) scheme, for the benchmark table.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, NamedTuple

import jax
from jax.sharding import AxisType, Mesh

from globalattn import _validate as V
from globalattn.attention import Window
from globalattn.seq_parallel import sequence_parallel_global_local_attention

__all__ = [
    "CommBytes",
    "comm_bytes_per_layer",
    "make_mesh",
    "sequence_parallel_global_local_attention",
]


def make_mesh(shape: Dict[str, int]) -> Mesh:
    """A device mesh from ``{axis_name: size}`` (in order), e.g. ``{"data": 2, "seq": 4}``.

    Axis types are deliberately ``AxisType.Auto``, although ``jax.make_mesh``
    now defaults to ``Explicit``:

    * The library's sharding story is the Auto one: Flax Linen parameters
      carry logical axis names, activations get ``nn.with_logical_constraint``,
      and ``jax.jit`` takes in/out shardings; the compiler propagates the
      rest. Those are hints, which is what Auto axes mean.
    * Under Explicit axes sharding is part of every array's type and
      operations whose output sharding is ambiguous fail at trace time; the
      blockwise single-device kernel's reshapes of a T-sharded array do
      (``ShardingTypeError: This reshape is not supported``), so every such
      op would need an ``out_sharding``.
    * Manual code (:func:`sequence_parallel_global_local_attention`) states
      its layout in ``shard_map`` specs and works on Auto and Explicit meshes
      alike, so it does not need Explicit types.

    Uses the first ``prod(sizes)`` devices, ordered by ``jax.make_mesh`` for
    good collective performance on the physical topology.
    """
    if not isinstance(shape, dict) or not shape:
        raise ValueError(f"shape must be a non-empty dict {{axis_name: size}}, got {shape!r}")
    for name, size in shape.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mesh axis names must be non-empty strings, got {name!r} in {shape}")
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"mesh axis {name!r} must have a positive int size, got {size!r}")
    n = math.prod(shape.values())
    have = jax.device_count()
    if n > have:
        raise ValueError(f"mesh {shape} needs {n} devices but only {have} are available "
                         f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                         f"before importing jax)")
    return jax.make_mesh(tuple(int(s) for s in shape.values()), tuple(shape.keys()),
                         axis_types=(AxisType.Auto,) * len(shape))


class CommBytes(NamedTuple):
    """Per-device bytes communicated by one attention layer's forward pass.

    ``ours = halo + global_gather + global_rows`` is the halo + global scheme
    of :func:`sequence_parallel_global_local_attention`; ``ring`` is ring
    attention (every K/V chunk visits every device).
    """
    halo: float
    global_gather: float
    global_rows: float
    ours: float
    ring: float


def comm_bytes_per_layer(
    *,
    seq_len: int,
    num_devices: int,
    local_window_size: Window,
    max_globals: int,
    num_heads: int,
    head_dim: int,
    batch_size: int = 1,
    bytes_per_element: int = 4,
    is_causal: bool = False,
) -> CommBytes:
    """Bytes each device sends per layer (forward pass), ours vs a ring scheme.

    Cost model per collective on P devices (bandwidth-optimal ring algorithms),
    S = bytes of the per-device result:

    * collective-permute (a halo): S;
    * all-reduce (psum, pmax): ``2 (P-1)/P * S``;
    * all-gather: ``(P-1)/P * S``.

    With s = ``bytes_per_element`` (q/k/v dtype), C = T/P, window (L, R)
    (R = 0 when causal), padding flags 1 byte, positions/counts/statistics
    4 bytes, a = 2 (P-1)/P:

    * halo          = B (L + R) (2 N H s + 1)             [k, v, pad flags]
    * global_gather = a B G (3 N H s + 4) + (P-1) B 4     [q/k/v rows + positions; counts]
    * global_rows   = a B G (N H 4 + 2 N 4)               [f32 outputs; max; denominators]
    * ring          = (P-1) B C (2 N H s + 1)             [k, v, pad flags of every chunk]

    ``max_globals=0`` stands for "no global_mask" (a global_mask with G = 0
    still all-gathers the counts, ``(P-1) B 4`` bytes, to detect overflow).

    ``ours`` has no T in it; ``ring`` grows linearly with T. The test suite
    checks ``ours`` against the collectives in the compiled HLO. The backward
    pass roughly doubles both (each collective has a transposed partner).
    """
    T = V.check_positive_int(seq_len, "seq_len")
    P = V.check_positive_int(num_devices, "num_devices")
    G = V.check_nonneg_int(max_globals, "max_globals")
    N = V.check_positive_int(num_heads, "num_heads")
    H = V.check_positive_int(head_dim, "head_dim")
    B = V.check_positive_int(batch_size, "batch_size")
    s = V.check_positive_int(bytes_per_element, "bytes_per_element")
    if T % P:
        raise ValueError(f"seq_len={T} is not divisible by num_devices={P}")
    C = T // P
    left, right = V.normalize_window(local_window_size)
    if is_causal:
        right = 0
    left, right = min(left, T - 1), min(right, T - 1)
    if left > C or right > C:
        raise ValueError(f"local_window_size (left={left}, right={right}) is larger than the "
                         f"per-device chunk seq_len/num_devices = {T}/{P} = {C}")
    a = 2.0 * (P - 1) / P
    halo = 0.0 if P == 1 else float(B * (left + right) * (2 * N * H * s + 1))
    gather = a * B * G * (3 * N * H * s + 4) + (P - 1) * B * 4 if G else 0.0
    rows = a * B * G * (N * H * 4 + 2 * N * 4) if G else 0.0
    ring = float((P - 1) * B * C * (2 * N * H * s + 1))
    return CommBytes(halo=halo, global_gather=gather, global_rows=rows,
                     ours=halo + gather + rows, ring=ring)
