"""Pre-LayerNorm transformer encoder with a per-layer attention schedule.

Schedules (:func:`globalattn.modules.config.layer_kinds`):

* ``'global_local'`` -- every layer is global-local (window + globals [+ random]);
* ``'full'`` -- every layer attends every valid pair (the baseline);
* ``'interleaved'`` -- Gemma-style: ``local_per_full`` global-local layers,
  then one full layer, repeated.

``scan=True`` scans over repeats of one schedule period (1 layer, or
``local_per_full + 1`` layers when interleaved), so compile time does not grow
with depth; ``remat=True`` rematerialises each block (or scanned period) in
the backward pass. Parameters of scanned layers get a leading ``layers`` axis.
The encoder reads its shape from a validated
:class:`globalattn.modules.config.ModelConfig` and hands every layer the same
:class:`globalattn.modules.config.BlockConfig`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax

from globalattn.modules.block import MLP, TransformerBlock, layer_norm
from globalattn.modules.config import (SCHEDULES, BlockConfig, ModelConfig, layer_kinds,
                                       schedule_period)
from globalattn.sharding import BATCH, EMBED, LAYERS, LENGTH

Array = jax.Array

# EncoderBlock is the shared block under the name the encoder has always used.
EncoderBlock = TransformerBlock

__all__ = ["MLP", "EncoderBlock", "Encoder", "layer_kinds", "schedule_period", "SCHEDULES"]


class _Period(nn.Module):
    """One schedule period (consecutive blocks); the body of the layer scan."""

    kinds: Tuple[str, ...]
    block: BlockConfig

    @nn.compact
    def __call__(self, x, random_blocks, padding_mask, global_mask, deterministic):
        for p, kind in enumerate(self.kinds):
            rb = None if random_blocks is None or kind == "full" else random_blocks[p]
            x = TransformerBlock(self.block, kind, name=f"block_{p}")(
                x, padding_mask, global_mask, rb, deterministic)
        return x, None


class Encoder(nn.Module):
    """A stack of :class:`TransformerBlock` with a final LayerNorm.

    Attributes:
      config: the model config (num_layers, attention_schedule, local_per_full,
        scan, remat, dtypes); validated when it was built.
      block: every layer's BlockConfig (:meth:`ModelConfig.block`: window
        radius, global capacity, block size and sink logits come from the
        strategy).
    """

    config: ModelConfig
    block: BlockConfig

    @property
    def kinds(self) -> Tuple[str, ...]:
        return self.config.kinds

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array] = None,
                 random_blocks: Optional[Array] = None, deterministic: bool = True) -> Array:
        """x ``[B, T, D]``; masks bool ``[B, T]``; random_blocks ``[L, B|1, N, nb, r]``
        (one draw per layer; full layers ignore theirs) -> ``[B, T, D]``."""
        c = self.config
        L = c.num_layers
        kinds = self.kinds
        if random_blocks is not None and random_blocks.shape[0] != L:
            raise ValueError(
                f"random_blocks must have a leading layer axis of num_layers={L}, got "
                f"shape {random_blocks.shape}")
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
        if c.scan:
            P = c.scan_period  # ModelConfig checked that it divides L
            body = _Period
            if c.remat:
                # Argument 5 (self = 0) is `deterministic`, a Python bool.
                body = nn.remat(body, static_argnums=(5,))
            stack = nn.scan(
                body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=L // P,
                metadata_params={nn.PARTITION_NAME: LAYERS})
            rb = None if random_blocks is None else random_blocks.reshape(
                (L // P, P) + random_blocks.shape[1:])
            x, _ = stack(kinds[:P], self.block, name="layers")(
                x, rb, padding_mask, global_mask, deterministic)
        else:
            block = (nn.remat(TransformerBlock, static_argnums=(5,)) if c.remat
                     else TransformerBlock)
            for i, kind in enumerate(kinds):
                rb = None if random_blocks is None or kind == "full" else random_blocks[i]
                x = block(self.block, kind, name=f"layer_{i}")(
                    x, padding_mask, global_mask, rb, deterministic)
        return layer_norm(self.block.dtype, self.block.param_dtype, "ln_final")(x)
