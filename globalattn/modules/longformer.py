"""Longformer (Beltagy et al., 2020) as released by AllenAI, on our attention core.

Self-attention of layer l: query i attends keys ``i - w_l/2 .. i + w_l/2``
(``w_l = attention_windows[l]``, the Hugging Face total window, so the core's
``local_window_size = w_l // 2``), every global key, and global queries attend
every key through the separate ``query_global`` / ``key_global`` /
``value_global`` projections (``global_qkv=`` of
:func:`globalattn.global_local_attention`). A pair is counted once (a global
key inside the window is not counted twice), padded keys are never attended and
padded rows are 0, exactly as the Hugging Face implementation computes it.

:class:`Longformer` is the whole model: ``apply(variables, input_ids,
attention_mask=..., global_attention_mask=...)`` returns a dict with
``last_hidden_state [B, T, D]`` and, as the checkpoint has them,
``pooler_output [B, D]``, ``logits [B, C]`` (classification) or
``start_logits`` / ``end_logits [B, T]`` (extractive QA).

Default global tokens when ``global_attention_mask`` is None: none for the bare
encoder, the first token for classification, and for QA the question: every
token before the first ``sep_token_id`` of each example (any number of
separators may follow; a row without one is a ValueError). The QA default
needs concrete ``input_ids``; under jit pass ``global_attention_mask``.
"""
from __future__ import annotations

from typing import Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops.global_local import global_local_attention
from globalattn.ops.validate import is_concrete
from globalattn.modules.roberta import (ClassificationHead, Encoder, Pooler, PretrainedConfig,
                                        QuestionAnsweringHead, heads_in, roberta_positions)

Array = jax.Array

__all__ = ["LongformerSelfAttention", "Longformer", "question_global_mask"]


class LongformerSelfAttention(nn.Module):
    """``x [B, T, D]`` -> attention output ``[B, T, N, H]`` (before the output projection)."""

    cfg: PretrainedConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array],
                 random_blocks: Optional[Array]) -> Array:
        if random_blocks is not None:
            raise ValueError("Longformer attention takes no random_blocks")
        cfg = self.cfg
        q, k, v = (heads_in(cfg, n)(x) for n in ("query", "key", "value"))
        global_qkv = None
        if global_mask is not None or self.is_initializing():
            # Created at init even without globals, so every checkpoint tensor has a home.
            global_qkv = tuple(heads_in(cfg, n + "_global")(x)
                               for n in ("query", "key", "value"))
        if global_mask is None:
            global_qkv = None
        return global_local_attention(
            q, k, v, local_window_size=cfg.attention_windows[self.layer] // 2,
            global_mask=global_mask, padding_mask=padding_mask,
            max_globals=cfg.max_globals if global_mask is not None else None,
            global_qkv=global_qkv)


def question_global_mask(input_ids, sep_token_id: int, padding_mask=None) -> np.ndarray:
    """bool ``[B, T]``: the tokens before each example's first ``sep_token_id``.

    Concrete inputs only (it checks them): a row without the separator is a
    ValueError naming the rows.
    """
    if not is_concrete(input_ids):
        raise ValueError("the default QA global mask needs concrete input_ids; under jit pass "
                         "global_attention_mask (e.g. the question tokens) explicitly")
    ids = np.asarray(input_ids)
    is_sep = ids == sep_token_id
    if padding_mask is not None:
        is_sep &= np.asarray(padding_mask, bool)
    missing = np.flatnonzero(~is_sep.any(axis=1))
    if missing.size:
        raise ValueError(f"rows {missing.tolist()} of input_ids hold no sep_token_id="
                         f"{sep_token_id}, so their question tokens are unknown; pass "
                         f"global_attention_mask")
    first = is_sep.argmax(axis=1)
    return np.arange(ids.shape[1])[None, :] < first[:, None]


class Longformer(nn.Module):
    """The Longformer encoder with the checkpoint's pooler / task head (see module doc)."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 global_attention_mask: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, position_ids: Optional[Array] = None,
                 deterministic: bool = True) -> Dict[str, Array]:
        """``input_ids [B, T]`` int; ``attention_mask`` / ``global_attention_mask``
        ``[B, T]`` (1/True = real / global); ``token_type_ids``, ``position_ids``
        ``[B, T]`` int (default: zeros, and RoBERTa positions from the non-pad
        tokens of ``input_ids`` as Hugging Face computes them)."""
        cfg = self.cfg
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        B, T = input_ids.shape
        pad = (jnp.ones((B, T), bool) if attention_mask is None
               else _mask(attention_mask, (B, T), "attention_mask"))
        if global_attention_mask is not None:
            glob = _mask(global_attention_mask, (B, T), "global_attention_mask")
        elif cfg.head == "classify":
            glob = jnp.zeros((B, T), bool).at[:, 0].set(True)
        elif cfg.head == "qa":
            if cfg.sep_token_id is None:
                raise ValueError("QA default globals need sep_token_id in the config")
            glob = jnp.asarray(question_global_mask(input_ids, cfg.sep_token_id, attention_mask))
        else:
            glob = None
        if position_ids is None:
            position_ids = roberta_positions(input_ids != cfg.pad_token_id, cfg.pad_token_id)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((B, T), jnp.int32)
        _check_range(input_ids, cfg.vocab_size, "input_ids", "vocab_size")
        _check_range(position_ids, cfg.max_position_embeddings, "position_ids",
                     "max_position_embeddings")
        h = Encoder(cfg, LongformerSelfAttention, name="encoder")(
            input_ids, token_type_ids, position_ids, pad, glob, None, deterministic)
        return task_outputs(cfg, h, deterministic)


def task_outputs(cfg: PretrainedConfig, h: Array, deterministic: bool) -> Dict[str, Array]:
    """The output dict: hidden states plus the pooler / head the config has (inside a compact
    module, so the heads are its submodules)."""
    out = {"last_hidden_state": h}
    if cfg.pooler:
        out["pooler_output"] = Pooler(cfg, name="pooler")(h)
    if cfg.head == "classify":
        out["logits"] = ClassificationHead(cfg, name="classifier")(h, deterministic)
    elif cfg.head == "qa":
        out["start_logits"], out["end_logits"] = QuestionAnsweringHead(cfg, name="qa")(h)
    return out


def _mask(m, shape, name: str) -> Array:
    m = jnp.asarray(m)
    if m.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {m.shape}")
    return m.astype(bool)


def _check_range(ids, n: int, name: str, limit: str) -> None:
    """Ids outside the table would be clipped by the gather: refuse them (concrete ids only)."""
    if is_concrete(ids) and np.size(ids):
        host = np.asarray(ids)  # numpy: jnp reductions would be staged under an outer trace
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} must lie in [0, {limit}={n}); got min {lo}, max {hi}")
