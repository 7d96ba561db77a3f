"""The train state, its creation on a device mesh, and a content fingerprint.

Parameters are created sharded: the model's logical axis names (``embed``,
``heads``, ``mlp``, ...) map to mesh axes by logical-axis rules (default
:data:`globalattn.sharding.DEFAULT_LOGICAL_AXIS_RULES`, restricted to the
mesh's axes), the optimizer state follows its parameters, and the batch is
split over the batch axes (``data`` and ``fsdp``). On one CPU the mesh is
``{'data': 1, 'model': 1}`` and all of this is a no-op; a pod run changes
``config.mesh`` only.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from globalattn import sharding as sharding_lib

__all__ = [
    "LOGICAL_AXIS_RULES",
    "TrainState",
    "batch_sharding",
    "fingerprint",
    "init_inputs",
    "init_state",
    "init_train_state",
    "make_init_fn",
    "state_shardings",
    "with_shardings",
]

Array = jax.Array

# The default logical axis -> mesh axis rules (see globalattn.sharding): heads and MLP
# hidden units over 'model', 'embed' over 'fsdp', batch over 'data' and 'fsdp'; axes a
# mesh lacks are dropped, so on a {'data', 'model'} mesh parameters split over 'model' only.
LOGICAL_AXIS_RULES = sharding_lib.DEFAULT_LOGICAL_AXIS_RULES


@struct.dataclass
class TrainState:
    """Everything a train step reads and writes (checkpointed as one pytree).

    Attributes:
      step: int32 scalar, train steps taken (batches consumed), including
        skipped non-finite steps; the step's randomness is ``fold_in(key, step)``.
      params: model parameters (unboxed).
      opt_state: optax state; its step count advances only on applied updates.
      nonfinite_steps: int32 scalar, total steps skipped for a non-finite loss
        or gradient.
      consecutive_nonfinite: int32 scalar, skipped steps since the last applied one.
    """

    step: Array
    params: Any
    opt_state: Any
    nonfinite_steps: Array
    consecutive_nonfinite: Array


def init_inputs(seq_len: int) -> tuple[Array, Array, Array]:
    """Dummy ``(tokens, padding_mask, segment_ids)`` of shape [1, T] for ``model.init``."""
    return (jnp.zeros((1, seq_len), jnp.int32), jnp.ones((1, seq_len), bool),
            jnp.zeros((1, seq_len), jnp.int32))


def batch_sharding(mesh: Mesh, rules: Any = None) -> NamedSharding:
    """Leading (batch) dimension split over the mesh's batch axes ('data', 'fsdp')."""
    return sharding_lib.batch_sharding(mesh, rules)


def _boxed_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                 key: Array) -> TrainState:
    params = model.init({"params": key}, *init_inputs(seq_len))["params"]
    # Partitioning boxes survive optax's tree maps, so mu/nu inherit their parameter's axes.
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      nonfinite_steps=zero, consecutive_nonfinite=zero)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                    mesh: Mesh, rules: Any = None) -> tuple[TrainState, Any]:
    """``(abstract_state, shardings)`` of the train state on ``mesh``, computing nothing.

    ``abstract_state`` holds ShapeDtypeStructs (unboxed, with shardings): the
    restore target; ``shardings`` has one NamedSharding per leaf (for jit).
    ``rules``: logical-axis rules (None = the defaults).

    Raises:
      ValueError: a parameter dimension does not divide over its mesh axes.
    """
    key = jax.random.key(0)  # shapes do not depend on the key
    abstract = jax.eval_shape(lambda k: _boxed_state(model, tx, seq_len, k), key)
    shardings = sharding_lib.tree_shardings(abstract, mesh, rules)
    return with_shardings(nn.unbox(abstract), shardings), shardings


def init_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
               key: Array) -> TrainState:
    """A fresh unboxed state from ``key``, unjitted and unplaced (vmappable over ``key``).

    The values equal :func:`make_init_fn`'s for the same key; only the placement differs.
    """
    return nn.unbox(_boxed_state(model, tx, seq_len, key))


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                 shardings: Any):
    """The jitted ``init(key) -> TrainState`` creating every leaf directly in its shards."""
    return jax.jit(lambda k: nn.unbox(_boxed_state(model, tx, seq_len, k)),
                   out_shardings=shardings)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int,
                     key: Array, mesh: Mesh, shardings: Any) -> TrainState:
    """A fresh state (params from ``key``) created directly in its shards."""
    with jax.set_mesh(mesh):
        return make_init_fn(model, tx, seq_len, shardings)(key)


def with_shardings(state_like: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: an abstract target to restore onto a mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state_like, shardings)


def _bits(x: np.ndarray) -> np.ndarray:
    """The bit pattern of ``x`` as uint32 (8-byte types give two words per element)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_ or x.dtype.itemsize == 1:
        return x.astype(np.uint32)
    if x.dtype.itemsize == 2:
        return x.view(np.uint16).astype(np.uint32)
    if x.dtype.itemsize == 8:
        return x.view(np.uint32).reshape(x.shape + (2,)).sum(-1, dtype=np.uint32)
    return x.view(np.uint32)


def _global_index(shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """Row-major global flat positions (uint32, wrapping) of the block ``index`` of ``shape``."""
    flat = np.zeros((), np.uint32)
    stride = 1
    for dim in range(len(shape) - 1, -1, -1):
        start, stop, _ = index[dim].indices(shape[dim])
        pos = np.arange(start, stop, dtype=np.uint32) * np.uint32(stride % 2**32)
        flat = np.add.outer(pos, flat) if flat.ndim else pos
        stride *= shape[dim]
    return flat


def _leaf_hash(x: Any, salt: int) -> np.ndarray:
    """Two wrapping uint32 sums over the leaf's elements, weighted by global position."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    acc = np.zeros(2, np.uint32)
    with np.errstate(over="ignore"):
        for shard in x.addressable_shards:
            if shard.replica_id != 0:  # count each element once, whatever the replication
                continue
            bits = _bits(np.asarray(shard.data))
            idx = _global_index(x.shape, shard.index) if x.ndim else np.zeros((), np.uint32)
            a = bits * (np.uint32(2) * idx + np.uint32(1)) + np.uint32(salt)
            mixed = (bits ^ (idx * np.uint32(0x85EBCA6B))) * np.uint32(0xC2B2AE35)
            acc += np.array([a.sum(dtype=np.uint32), (mixed ^ (mixed >> np.uint32(15))).sum(
                dtype=np.uint32)], np.uint32)
    return acc


def fingerprint(tree: Any) -> str:
    """A 64-bit hex checksum of a pytree's exact contents (sharding-independent).

    Not cryptographic: it detects damage and mix-ups, not deliberate forgery.

    Stored next to each checkpoint and recomputed on restore, so a checkpoint
    whose bytes changed is detected instead of silently loaded. Computed on the
    host from each process's own shards (integer sums are exact, so neither the
    sharding nor the summation order matters), combined across processes.
    """
    total = np.zeros(2, np.uint32)
    with np.errstate(over="ignore"):
        for i, leaf in enumerate(jax.tree.leaves(tree)):
            h = _leaf_hash(leaf, (2 * i + 1) * 0x9E3779B1 % 2**32)
            total = total * np.uint32(31) + h  # order-dependent combination of leaves
    if jax.process_count() > 1:
        # Every step above is linear in the per-element terms, so the global value is
        # the wrapping sum of the per-process values.
        from jax.experimental import multihost_utils

        parts = np.asarray(multihost_utils.process_allgather(total)).reshape(-1, 2)
        with np.errstate(over="ignore"):
            total = parts.astype(np.uint32).sum(axis=0, dtype=np.uint32)
    return f"{int(total[0]):08x}{int(total[1]):08x}"
