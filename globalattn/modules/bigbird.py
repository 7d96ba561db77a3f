"""BigBird-ITC (Zaheer et al., 2020) as released by Google, on our attention core.

Block-sparse attention with block size b on the sequence padded to a multiple
of b (as the Hugging Face model pads it): the tokens of the first and the last
block are global; query block c attends key blocks ``c-1, c, c+1`` (a 3-block
window) and r random blocks. In the core this is ``local_window_size=0``, the
two global blocks as ``global_mask`` (capacity 2b) and, per query block, the
window blocks followed by the random blocks as ``random_blocks=`` (a block
listed twice counts once). Padded keys are never attended and padded rows are 0.

Random blocks (per layer and head, shared by the batch as in the reference):
explicit ``random_blocks=`` int ``[L, 1 or B, N, nb, r]`` (row c lists query
block c's random key blocks; rows 0 and nb-1, the global blocks, are unused),
or drawn by the config's policy: ``'resample'`` from the ``'random_blocks'``
rng collection, ``'fixed'`` from ``jax.random.key(eval_seed)``
(``train_random`` when ``deterministic=False``, ``eval_random`` otherwise).
Draws exclude the window and global blocks, as BigBird's do. Note: in eval
mode Hugging Face's generator returns block 0 for every random slot, so its
eval outputs weigh the first block several times; the core counts a pair once,
so those outputs are not reproduced (its training-mode pattern is).

As in Hugging Face, a sequence of at most ``(5 + 2r) b`` tokens is too short
for the block pattern and uses full attention (``attention_type
'original_full'`` always does); the core then runs with a window covering T.

:class:`BigBird` returns the same dict as :class:`globalattn.modules.longformer.Longformer`.
"""
from __future__ import annotations

from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from globalattn.ops.dense import random_block_indices
from globalattn.ops.global_local import global_local_attention
from globalattn.modules.longformer import _check_range, _mask, task_outputs
from globalattn.modules.roberta import Encoder, PretrainedConfig, heads_in

Array = jax.Array

__all__ = ["BigBirdSelfAttention", "BigBird", "uses_block_sparse", "draw_random_blocks",
           "window_and_random_blocks"]


def uses_block_sparse(cfg: PretrainedConfig, seq_len: int) -> bool:
    """Whether a length-``seq_len`` input takes the block-sparse path (else full attention)."""
    return (cfg.attention_type == "block_sparse"
            and seq_len > (5 + 2 * cfg.num_random_blocks) * cfg.block_size)


def draw_random_blocks(cfg: PretrainedConfig, key: Array, seq_len: int) -> Array:
    """BigBird's random key blocks, int32 ``[L, 1, N, nb, r]`` for a (block-padded) length.

    Excludes each query block's window (c-1, c, c+1) and the two global blocks.
    """
    nb = -(-seq_len // cfg.block_size)
    draw = lambda k: random_block_indices(  # noqa: E731
        k, seq_len=seq_len, block_size=cfg.block_size,
        num_random_blocks=cfg.num_random_blocks, batch_size=1, num_heads=cfg.num_heads,
        exclude_window_blocks=1, exclude_blocks=(0, nb - 1))
    return jax.vmap(draw)(jax.random.split(key, cfg.num_layers))


def window_and_random_blocks(random_blocks: Array) -> Array:
    """``[..., nb, r]`` random blocks -> ``[..., nb, 3 + r]`` with the window blocks first."""
    nb = random_blocks.shape[-2]
    win = jnp.clip(jnp.arange(nb)[:, None] + jnp.arange(-1, 2)[None, :], 0, nb - 1)
    win = jnp.broadcast_to(win, random_blocks.shape[:-1] + (3,)).astype(jnp.int32)
    return jnp.concatenate([win, random_blocks.astype(jnp.int32)], axis=-1)


class BigBirdSelfAttention(nn.Module):
    """``x [B, T, D]`` -> ``[B, T, N, H]``; ``random_blocks`` ``[B|1, N, nb, 3 + r]`` (window
    then random key blocks per query block) selects block-sparse, None full attention."""

    cfg: PretrainedConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array],
                 random_blocks: Optional[Array]) -> Array:
        cfg = self.cfg
        q, k, v = (heads_in(cfg, n, use_bias=cfg.use_bias)(x) for n in ("query", "key", "value"))
        T = x.shape[1]
        if random_blocks is None:
            return global_local_attention(q, k, v, local_window_size=T, padding_mask=padding_mask)
        return global_local_attention(
            q, k, v, local_window_size=0, global_mask=global_mask, padding_mask=padding_mask,
            max_globals=2 * cfg.block_size, random_blocks=random_blocks,
            block_size=cfg.block_size)


class BigBird(nn.Module):
    """The BigBird encoder with the checkpoint's pooler / task head (see module doc)."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 global_attention_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, position_ids: Optional[Array] = None,
                 random_blocks: Optional[Array] = None,
                 deterministic: bool = True) -> Dict[str, Array]:
        """``input_ids [B, T]``; ``attention_mask [B, T]`` (1 = real); ``token_type_ids``,
        ``position_ids`` ``[B, T]`` (default zeros and ``0 .. T-1``); ``random_blocks``
        int ``[L, 1|B, N, ceil(T/b), r]`` or None (the config's policy).
        ``global_attention_mask`` exists for a signature shared with Longformer and
        must be None: BigBird's global tokens are its first and last blocks."""
        cfg = self.cfg
        if global_attention_mask is not None:
            raise ValueError("BigBird takes no global_attention_mask: its global tokens are the "
                             "first and last blocks")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        B, T = input_ids.shape
        pad = (jnp.ones((B, T), bool) if attention_mask is None
               else _mask(attention_mask, (B, T), "attention_mask"))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        sparse = uses_block_sparse(cfg, T)
        bs = cfg.block_size
        Tp = -(-T // bs) * bs if sparse else T
        extra = Tp - T
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(Tp), (B, Tp))
        elif extra:
            position_ids = jnp.pad(position_ids, ((0, 0), (0, extra)),
                                   constant_values=cfg.pad_token_id)
        if extra:
            # The block pattern is defined on whole blocks: pad (masked) as the reference does.
            input_ids = jnp.pad(input_ids, ((0, 0), (0, extra)), constant_values=cfg.pad_token_id)
            pad = jnp.pad(pad, ((0, 0), (0, extra)))
            token_type_ids = jnp.pad(token_type_ids, ((0, 0), (0, extra)))
        _check_range(input_ids, cfg.vocab_size, "input_ids", "vocab_size")
        _check_range(position_ids, cfg.max_position_embeddings, "position_ids",
                     "max_position_embeddings")
        glob, blocks = None, None
        if sparse:
            nb = Tp // bs
            blk = jnp.arange(Tp) // bs
            glob = jnp.broadcast_to((blk == 0) | (blk == nb - 1), (B, Tp))
            if random_blocks is None:
                random_blocks = self._draw(Tp, deterministic)
            else:
                want = (cfg.num_layers, nb, cfg.num_random_blocks)
                rb = jnp.asarray(random_blocks)
                if (rb.ndim != 5 or (rb.shape[0], rb.shape[3], rb.shape[4]) != want
                        or rb.shape[1] not in (1, B) or rb.shape[2] != cfg.num_heads):
                    raise ValueError(
                        f"random_blocks must have shape [L={cfg.num_layers}, 1 or B={B}, "
                        f"N={cfg.num_heads}, nb={nb}, r={cfg.num_random_blocks}] for T={T} "
                        f"(padded to {Tp}), got {rb.shape}")
            blocks = window_and_random_blocks(random_blocks)
        elif random_blocks is not None:
            raise ValueError(f"random_blocks given but T={T} takes the full-attention path "
                             f"(attention_type={cfg.attention_type!r}, block_size={bs}, "
                             f"num_random_blocks={cfg.num_random_blocks})")
        h = Encoder(cfg, BigBirdSelfAttention, name="encoder")(
            input_ids, token_type_ids, position_ids, pad, glob, blocks, deterministic)
        out = task_outputs(cfg, h, deterministic)
        out["last_hidden_state"] = out["last_hidden_state"][:, :T]
        if "start_logits" in out:
            for k in ("start_logits", "end_logits"):
                out[k] = out[k][:, :T]
        return out

    def _draw(self, seq_len: int, deterministic: bool) -> Array:
        cfg = self.cfg
        policy = cfg.eval_random if deterministic else cfg.train_random
        if policy == "fixed":
            key = jax.random.key(cfg.eval_seed)
        else:
            if not self.has_rng("random_blocks"):
                raise ValueError("random policy 'resample' needs the 'random_blocks' rng: pass "
                                 "rngs={'random_blocks': key} to apply, or use policy 'fixed'")
            key = self.make_rng("random_blocks")
        return draw_random_blocks(cfg, key, seq_len)
