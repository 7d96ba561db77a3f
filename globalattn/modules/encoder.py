"""Pre-LayerNorm transformer encoder with a per-layer attention schedule.

Schedules (``layer_kinds``):

* ``'global_local'`` -- every layer is global-local (window + globals [+ random]);
* ``'full'`` -- every layer attends every valid pair (the baseline);
* ``'interleaved'`` -- Gemma-style: ``local_per_full`` global-local layers,
  then one full layer, repeated.

``scan=True`` scans over repeats of one schedule period (1 layer, or
``local_per_full + 1`` layers when interleaved), so compile time does not grow
with depth; ``remat=True`` rematerialises each block (or scanned period) in
the backward pass. Parameters of scanned layers get a leading ``layers`` axis.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.modules.attention import GlobalLocalSelfAttention

Array = jax.Array
Window = Union[int, Tuple[int, int]]

__all__ = ["MLP", "EncoderBlock", "Encoder", "layer_kinds", "SCHEDULES"]

SCHEDULES = ("global_local", "full", "interleaved")


def layer_kinds(schedule: str, num_layers: int, local_per_full: int = 3) -> Tuple[str, ...]:
    """Attention kind of every layer, e.g. interleaved k=2, L=6 -> (gl, gl, full) * 2."""
    if schedule not in SCHEDULES:
        raise ValueError(f"attention_schedule {schedule!r} not in {SCHEDULES}")
    if schedule == "interleaved":
        if local_per_full < 1:
            raise ValueError(f"local_per_full must be >= 1, got {local_per_full}")
        p = local_per_full + 1
        return tuple("full" if (i + 1) % p == 0 else "global_local" for i in range(num_layers))
    return (schedule,) * num_layers


def schedule_period(schedule: str, local_per_full: int) -> int:
    return local_per_full + 1 if schedule == "interleaved" else 1


def layer_norm(dtype, param_dtype, name=None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class MLP(nn.Module):
    """D -> mlp_dim -> D with GELU and dropout on the hidden layer."""

    mlp_dim: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        D = x.shape[-1]
        h = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.xavier_uniform(), ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                     name="wi")(x)
        h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        y = nn.Dense(D, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.with_logical_partitioning(
                         nn.initializers.xavier_uniform(), ("mlp", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                     name="wo")(h)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class EncoderBlock(nn.Module):
    """x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x))). ``[B, T, D] -> [B, T, D]``."""

    num_heads: int
    mlp_dim: int
    kind: str = "global_local"
    window: Window = 0
    causal: bool = False
    max_globals: int = 0
    block_size: Optional[int] = None
    global_projections: bool = False
    sink_logits: bool = False
    rope: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array],
                 random_blocks: Optional[Array], deterministic: bool) -> Array:
        h = layer_norm(self.dtype, self.param_dtype, "ln_attn")(x)
        h = GlobalLocalSelfAttention(
            num_heads=self.num_heads, window=self.window, kind=self.kind, causal=self.causal,
            max_globals=self.max_globals, block_size=self.block_size,
            global_projections=self.global_projections, sink_logits=self.sink_logits,
            rope=self.rope, dtype=self.dtype, param_dtype=self.param_dtype, name="attn")(
                h, padding_mask, global_mask, random_blocks)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        h = layer_norm(self.dtype, self.param_dtype, "ln_mlp")(x)
        h = MLP(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype, name="mlp")(
            h, deterministic)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _Period(nn.Module):
    """One schedule period (consecutive blocks); the body of the layer scan."""

    kinds: Tuple[str, ...]
    block: Any  # kwargs for EncoderBlock, as a tuple of (name, value) pairs

    @nn.compact
    def __call__(self, x, random_blocks, padding_mask, global_mask, deterministic):
        for p, kind in enumerate(self.kinds):
            rb = None if random_blocks is None or kind == "full" else random_blocks[p]
            x = EncoderBlock(kind=kind, **dict(self.block), name=f"block_{p}")(
                x, padding_mask, global_mask, rb, deterministic)
        return x, None


class Encoder(nn.Module):
    """A stack of :class:`EncoderBlock` with a final LayerNorm.

    Attributes mirror the model config (see ``default_model_config``);
    ``max_globals`` / ``block_size`` / ``sink_logits`` come from the strategy.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    window: Window = 0
    schedule: str = "global_local"
    local_per_full: int = 3
    causal: bool = False
    max_globals: int = 0
    block_size: Optional[int] = None
    global_projections: bool = False
    sink_logits: bool = False
    rope: bool = False
    dropout_rate: float = 0.0
    remat: bool = False
    scan: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _block_kwargs(self) -> Tuple[Tuple[str, Any], ...]:
        return (("num_heads", self.num_heads), ("mlp_dim", self.mlp_dim),
                ("window", self.window), ("causal", self.causal),
                ("max_globals", self.max_globals), ("block_size", self.block_size),
                ("global_projections", self.global_projections),
                ("sink_logits", self.sink_logits), ("rope", self.rope),
                ("dropout_rate", self.dropout_rate),
                ("dtype", self.dtype), ("param_dtype", self.param_dtype))

    @property
    def kinds(self) -> Tuple[str, ...]:
        return layer_kinds(self.schedule, self.num_layers, self.local_per_full)

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array] = None,
                 random_blocks: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x ``[B, T, D]``; masks bool ``[B, T]``; random_blocks ``[L, B|1, N, nb, r]``
        (one draw per layer; full layers ignore theirs) -> ``[B, T, D]``."""
        L = self.num_layers
        kinds = self.kinds
        if random_blocks is not None and random_blocks.shape[0] != L:
            raise ValueError(
                f"random_blocks must have a leading layer axis of num_layers={L}, got "
                f"shape {random_blocks.shape}")
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if self.scan:
            P = schedule_period(self.schedule, self.local_per_full)
            if L % P:
                raise ValueError(
                    f"scan needs num_layers={L} to be a multiple of the schedule period {P} "
                    f"(schedule={self.schedule!r}, local_per_full={self.local_per_full})")
            body = _Period
            if self.remat:
                # Argument 5 (self = 0) is `deterministic`, a Python bool.
                body = nn.remat(body, static_argnums=(5,))
            stack = nn.scan(
                body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=L // P,
                metadata_params={nn.PARTITION_NAME: "layers"})
            rb = None if random_blocks is None else random_blocks.reshape(
                (L // P, P) + random_blocks.shape[1:])
            x, _ = stack(kinds[:P], self._block_kwargs(), name="layers")(
                x, rb, padding_mask, global_mask, deterministic)
        else:
            block = nn.remat(EncoderBlock, static_argnums=(5,)) if self.remat else EncoderBlock
            for i, kind in enumerate(kinds):
                rb = None if random_blocks is None or kind == "full" else random_blocks[i]
                x = block(kind=kind, **dict(self._block_kwargs()), name=f"layer_{i}")(
                    x, padding_mask, global_mask, rb, deterministic)
        return layer_norm(self.dtype, self.param_dtype, "ln_final")(x)
