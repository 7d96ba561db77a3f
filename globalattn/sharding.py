"""Device meshes, logical-axis rules, shardings, and sequence-parallel attention.

* :func:`make_mesh` -- a named device mesh with Auto axes (why: see its docstring).
* :func:`resolve_mesh_shape` / :func:`mesh_from_config` -- ``config.mesh``
  (``{'data': -1, 'fsdp': 1, 'model': 1}``, one ``-1`` = the devices left) to a mesh.
* :data:`DEFAULT_LOGICAL_AXIS_RULES`, :func:`logical_axis_rules` -- which mesh
  axes each logical axis name (``batch``, ``embed``, ``heads``, ...) is split over,
  restricted to the axes a mesh has.
* :func:`tree_shardings`, :func:`batch_sharding`, :func:`batch_axes` -- NamedShardings
  for a boxed (logically annotated) parameter / state tree and for batches,
  with divisibility checks that name the offending leaf.
* :func:`sequence_parallel_global_local_attention` -- global + local attention
  with T split across devices (defined in :mod:`globalattn.ops.seq_parallel`).
* :func:`comm_bytes_per_layer` -- per-device bytes that scheme communicates,
  next to a ring (all-to-all K/V) scheme, for the benchmark table.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from globalattn.ops import validate as V
from globalattn.ops.dense import Window
from globalattn.ops.seq_parallel import sequence_parallel_global_local_attention

__all__ = [
    "BATCH",
    "EMBED",
    "HEADS",
    "KV",
    "LAYERS",
    "LENGTH",
    "LOGICAL_AXES",
    "MLP",
    "VOCAB",
    "BATCH_MESH_AXES",
    "CommBytes",
    "DEFAULT_LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "batch_axes",
    "data_parallel_size",
    "batch_sharding",
    "check_divisible",
    "comm_bytes_per_layer",
    "logical_axis_rules",
    "make_mesh",
    "mesh_from_config",
    "resolve_mesh_shape",
    "rules_from_config",
    "tree_shardings",
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


MeshAxes = Union[None, str, Tuple[str, ...]]
Rules = Tuple[Tuple[str, MeshAxes], ...]

# Mesh axes the library knows, in mesh order (outermost first: data parallelism has the
# least communication, so it spans the slowest links, e.g. across hosts / DCN):
#   data  -- pure data parallelism (parameters replicated);
#   fsdp  -- data parallelism with parameters and optimizer state split along 'embed'
#            (ZeRO-3 / FSDP: gathered per layer by the compiler, gradients reduce-scattered);
#   model -- tensor parallelism: attention heads and MLP hidden units;
#   seq   -- sequence parallelism (sequence_parallel_global_local_attention only).
MESH_AXES = ("data", "fsdp", "model", "seq")
BATCH_MESH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# Logical axis names: every parameter (nn.with_logical_partitioning) and activation
# (nn.with_logical_constraint) of the modules is annotated with these, and the rules below
# map them to mesh axes.
BATCH = "batch"  # B
LENGTH = "length"  # T (activations only)
EMBED = "embed"  # D
HEADS = "heads"  # N
KV = "kv"  # H, the head dim
MLP = "mlp"  # the MLP hidden width
VOCAB = "vocab"  # vocabulary and class counts
LAYERS = "layers"  # the stacked-layer axis of scanned parameters
LOGICAL_AXES = (BATCH, LENGTH, EMBED, HEADS, KV, MLP, VOCAB, LAYERS)

# Logical axis -> mesh axis (or axes, or None = replicated). vocab stays replicated: class
# and vocabulary counts rarely divide a mesh axis. Activations' 'length' maps to 'seq'.
DEFAULT_LOGICAL_AXIS_RULES: Rules = (
    (BATCH, BATCH_MESH_AXES),
    (LENGTH, "seq"),
    (EMBED, "fsdp"),
    (HEADS, "model"),
    (MLP, "model"),
    (KV, None),
    (VOCAB, None),
    (LAYERS, None),
)


def resolve_mesh_shape(mesh: Mapping[str, int], device_count: Optional[int] = None
                       ) -> Dict[str, int]:
    """``{axis: size}`` with at most one ``-1`` replaced by the devices left over.

    Order is kept (it is the mesh order). A mesh smaller than the device count
    is allowed (it uses the first devices) only when no axis is ``-1``.

    Raises:
      ValueError: a bad size, two ``-1`` axes, or sizes that do not fit the
        devices, naming the values.
    """
    n_dev = jax.device_count() if device_count is None else device_count
    shape = {str(k): v for k, v in dict(mesh).items()}
    if not shape:
        raise ValueError("mesh must name at least one axis, got {}")
    for name, size in shape.items():
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (
                size != -1 and size < 1):
            raise ValueError(f"mesh axis {name!r} must be -1 or a positive int, got {size!r} "
                             f"in {shape}")
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"mesh axes {free} are all -1; at most one axis can take the devices "
                         f"left over (mesh {shape})")
    fixed = math.prod(v for v in shape.values() if v != -1)
    if free:
        if n_dev % fixed:
            raise ValueError(f"mesh {shape}: the fixed axes use {fixed} devices, which does not "
                             f"divide the {n_dev} devices, so {free[0]}=-1 cannot take the rest")
        shape[free[0]] = n_dev // fixed
    elif fixed > n_dev:
        raise ValueError(f"mesh {shape} needs {fixed} devices but there are only {n_dev}")
    return {k: int(v) for k, v in shape.items()}


def mesh_from_config(mesh_config: Mapping[str, int], device_count: Optional[int] = None
                     ) -> Mesh:
    """:func:`make_mesh` of :func:`resolve_mesh_shape` (``config.mesh`` -> Mesh)."""
    return make_mesh(resolve_mesh_shape(mesh_config, device_count))


def _as_axes(value: Any) -> MeshAxes:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(a, str) for a in value):
        return tuple(value)
    raise ValueError(f"a logical-axis rule maps to a mesh axis name, a tuple of names or None; "
                     f"got {value!r}")


def rules_from_config(rules: Optional[Sequence[Sequence[Any]]]) -> Rules:
    """Validated ``((logical, mesh_axes), ...)`` from a config value (None = the defaults)."""
    if rules is None:
        return DEFAULT_LOGICAL_AXIS_RULES
    out = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"each logical-axis rule is (logical_name, mesh_axes), got {rule!r}")
        out.append((rule[0], _as_axes(rule[1])))
    names = [r[0] for r in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        # flax uses the first matching rule; a second one would be silently ignored.
        raise ValueError(f"logical axes {dupes} appear in more than one rule: {rules!r}")
    return tuple(out)


def logical_axis_rules(mesh: Mesh, rules: Optional[Sequence[Sequence[Any]]] = None) -> Rules:
    """``rules`` (default :data:`DEFAULT_LOGICAL_AXIS_RULES`) restricted to ``mesh``'s axes.

    A mesh axis the mesh lacks is dropped from its rule (``('data', 'fsdp')`` on a
    mesh without 'fsdp' becomes ``'data'``), so one rule set serves every mesh.
    """
    have = set(mesh.axis_names)
    out = []
    for logical, axes in rules_from_config(rules):
        if axes is None:
            out.append((logical, None))
            continue
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in have)
        out.append((logical, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def batch_axes(mesh: Mesh, rules: Optional[Sequence[Sequence[Any]]] = None) -> MeshAxes:
    """The mesh axes the logical 'batch' axis is split over on ``mesh`` (None = none)."""
    return dict(logical_axis_rules(mesh, rules)).get(BATCH)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def batch_sharding(mesh: Mesh, rules: Optional[Sequence[Sequence[Any]]] = None
                   ) -> NamedSharding:
    """Leading (batch) dimension split over :func:`batch_axes`; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh, rules)))


def data_parallel_size(mesh: Mesh, rules: Optional[Sequence[Sequence[Any]]] = None) -> int:
    """How many ways the batch is split (product of the batch mesh axes)."""
    return _axes_size(mesh, batch_axes(mesh, rules))


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raises ValueError if any leaf dimension is not divisible by its mesh axes' size.

    JAX would otherwise pad uneven shards silently (or fail deep inside XLA);
    the error names the leaf path, its shape and the partition spec.
    """
    leaves = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != len(shards):
        raise ValueError(f"tree has {len(leaves)} leaves but {len(shards)} shardings")
    bad = []
    for (path, leaf), sh in zip(leaves, shards):
        for dim, axes in zip(leaf.shape, sh.spec):
            size = _axes_size(sh.mesh, axes)
            if dim % size:
                bad.append(f"{jax.tree_util.keystr(path)} shape {tuple(leaf.shape)} spec "
                           f"{sh.spec}: dim {dim} not divisible by {axes}={size}")
    if bad:
        raise ValueError("parameters do not divide over the mesh "
                         f"{dict(sh.mesh.shape)}:\n  " + "\n  ".join(bad))


def tree_shardings(boxed_abstract: Any, mesh: Mesh,
                   rules: Optional[Sequence[Sequence[Any]]] = None) -> Any:
    """One NamedSharding per leaf of a tree of ``nn.Partitioned`` boxes (e.g. from eval_shape).

    Leaves without logical names (step counters, optimizer counts) are replicated.
    Checked with :func:`check_divisible`.
    """
    specs = nn.get_partition_spec(boxed_abstract)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_axis_rules(mesh, rules))
    check_divisible(nn.unbox(boxed_abstract), shardings)
    return shardings


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
