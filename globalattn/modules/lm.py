"""A causal language model with RoPE, attention sinks and a streaming decode path.

:class:`CausalLM`: token embedding (no absolute positions: RoPE in every
layer) -> ``P`` learned sink tokens prepended -> ``L`` pre-LN blocks of causal
self-attention + MLP -> LayerNorm -> vocabulary logits at the data positions.

Attention sinks, the three kinds StreamingLLM compares:

* ``num_sink_tokens = P > 0``: P learned tokens at the start of every stream
  (StreamingLLM's "learnable sink token"). With a local ``window`` they are
  global tokens of the kernel, so every query sees them;
* ``sink_logits='learned'``: a learned per-head logit of an extra softmax
  column with value 0 (gpt-oss), initialised at 0;
* ``sink_logits='zero'``: that logit fixed at 0, i.e. softmax-one
  ``exp(s_j) / (1 + sum_k exp(s_k))`` (StreamingLLM's "zero sink").

One set of parameters, four ways to run it (same blocks, different attention):

* ``__call__(tokens, padding_mask)`` -- training / evaluation at true
  positions ``0 .. P+T-1``. ``window=None``: full causal attention (a causal
  window covering the sequence);
  ``window=W``: :func:`globalattn.global_local_attention` with a causal window
  of W tokens (the query's own included) and the sink tokens global.
* ``windowed(tokens, num_sink_slots=G, window=W)`` -- the streaming oracle:
  :func:`globalattn.ops.streaming.sink_window_attention` in every layer (what a
  cache of G sinks + W recent tokens computes, cache-position RoPE).
* ``decode(tokens [B], cache)`` / ``decode_sink(i, cache)`` -- one token
  through a :class:`globalattn.ops.streaming.KVCache`; use the helpers of
  :mod:`globalattn.modules.decode` (``new_stream``, ``make_decode_step``, ...).
* ``attention_weights(tokens)`` -- per-layer attention maps (true positions,
  dense causal), for the sink metric.

Shapes: B batch, T data length, P sink tokens, L layers, N heads, H head dim,
D model dim, V vocabulary.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops import streaming
from globalattn.ops.global_local import global_local_attention
from globalattn.modules.block import Attend, TransformerBlock, layer_norm
from globalattn.modules.config import SINK_LOGITS, BlockConfig
from globalattn.ops.rope import DEFAULT_BASE, apply_rope
from globalattn.sharding import EMBED, VOCAB

Array = jax.Array
# The LM's blocks are the shared pre-LN block, attending through an ``attend`` function.
LMBlock = TransformerBlock

__all__ = ["CausalLM", "LMBlock", "SINK_LOGITS"]


class CausalLM(nn.Module):
    """Causal LM with RoPE and attention sinks (see the module docstring).

    Attributes:
      vocab_size, d_model, num_heads, num_layers, mlp_dim: V, D, N, L, MLP width.
      window: None (dense causal) or W >= 1: query t sees keys ``t-W+1 .. t``
        plus the sink tokens, in ``__call__`` only (the other paths take their
        own cache shape).
      num_sink_tokens: P learned tokens prepended to every sequence / stream.
      sink_logits: ``'none'``, ``'learned'`` or ``'zero'`` (softmax-one).
      rope_base: RoPE base.
      dropout_rate: embeddings, residual branches, MLP hidden (training only).
      dtype, param_dtype: computation / parameter dtypes (softmax is float32).
    """

    vocab_size: int = 128
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    window: Optional[int] = None
    num_sink_tokens: int = 0
    sink_logits: str = "none"
    rope_base: float = DEFAULT_BASE
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def _check(self) -> None:
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "mlp_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CausalLM {name} must be a positive int, got {v!r}")
        if self.d_model % self.num_heads or self.head_dim % 2:
            raise ValueError(f"d_model={self.d_model} / num_heads={self.num_heads} must be an "
                             "even integer head dim (RoPE rotates pairs)")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"CausalLM window must be None or an int >= 1, got {self.window!r}")
        if not isinstance(self.num_sink_tokens, int) or self.num_sink_tokens < 0:
            raise ValueError(f"num_sink_tokens must be an int >= 0, got {self.num_sink_tokens!r}")
        if self.sink_logits not in SINK_LOGITS:
            raise ValueError(f"sink_logits={self.sink_logits!r} not in {SINK_LOGITS}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def setup(self):
        self._check()
        init = nn.initializers.normal(0.02)
        self.embed = nn.Embed(self.vocab_size, self.d_model, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              embedding_init=nn.with_logical_partitioning(init, (VOCAB, EMBED)))
        if self.num_sink_tokens:
            self.sink_tokens = self.param(
                "sink_tokens", nn.with_logical_partitioning(init, (None, EMBED)),
                (self.num_sink_tokens, self.d_model), self.param_dtype)
        block = BlockConfig(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                            head_dim=self.head_dim, sink_logits=self.sink_logits,
                            dropout_rate=self.dropout_rate, dtype=self.dtype,
                            param_dtype=self.param_dtype)
        self.blocks = [TransformerBlock(block) for _ in range(self.num_layers)]
        self.ln_final = layer_norm(self.dtype, self.param_dtype)
        self.head = nn.Dense(
            self.vocab_size, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                     (EMBED, VOCAB)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (VOCAB,)))
        self.embed_dropout = nn.Dropout(self.dropout_rate)

    # ---- shared pieces -----------------------------------------------------
    def _stream_inputs(self, tokens: Array, padding_mask: Optional[Array]):
        """Embeddings ``[B, P + T, D]`` with the sink tokens first, and their padding mask."""
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [B, T], got {tokens.dtype} {tokens.shape}")
        B, T = tokens.shape
        if padding_mask is None:
            padding_mask = jnp.ones((B, T), bool)
        if padding_mask.shape != (B, T) or padding_mask.dtype != jnp.bool_:
            raise ValueError(f"padding_mask must be bool [B, T] = {(B, T)}, got "
                             f"{padding_mask.dtype} {padding_mask.shape}")
        x = self.embed(tokens)
        P = self.num_sink_tokens
        if P:
            sinks = jnp.broadcast_to(self.sink_tokens.astype(x.dtype), (B, P, self.d_model))
            x = jnp.concatenate([sinks, x], axis=1)
            padding_mask = jnp.concatenate([jnp.ones((B, P), bool), padding_mask], axis=1)
        return x, padding_mask

    def _run(self, x: Array, attend_for_layer: Callable[[int], Attend], deterministic: bool
             ) -> Array:
        """Blocks, final LN and head over ``[B, P + T, D]``; logits at data positions."""
        x = self.embed_dropout(x, deterministic=deterministic)
        for i, block in enumerate(self.blocks):
            x, _ = block(x, deterministic=deterministic, attend=attend_for_layer(i))
        logits = self.head(self.ln_final(x)).astype(jnp.float32)
        return logits[:, self.num_sink_tokens:]

    # ---- the four paths ----------------------------------------------------
    def __call__(self, tokens: Array, padding_mask: Optional[Array] = None,
                 segment_ids: Optional[Array] = None, *, num_active_globals: Any = None,
                 deterministic: bool = True) -> Array:
        """Next-token logits float32 ``[B, T, V]`` (``logits[:, t]`` predicts ``tokens[:, t+1]``).

        ``padding_mask`` bool ``[B, T]`` (default all real). ``segment_ids`` is
        accepted and ignored (one text stream), and ``num_active_globals`` must be
        None: the signature is the train-step contract of
        :func:`globalattn.train.make_train_step`.
        """
        if num_active_globals is not None:
            raise ValueError("CausalLM has a fixed number of sink tokens; num_active_globals "
                             f"must be None, got {num_active_globals!r}")
        del segment_ids
        x, pad = self._stream_inputs(tokens, padding_mask)
        S, P = x.shape[1], self.num_sink_tokens
        pos = jnp.arange(S, dtype=jnp.int32)
        glob = np.broadcast_to(np.arange(S) < P, pad.shape) if (P and self.window) else None

        def attend(q, k, v, sinks, state):
            q, k = apply_rope(q, pos, base=self.rope_base), apply_rope(k, pos, base=self.rope_base)
            # Full causal attention is the window that covers the sequence.
            left = S - 1 if self.window is None else self.window - 1
            return global_local_attention(
                q, k, v, local_window_size=(left, 0), global_mask=glob,
                padding_mask=pad, is_causal=True, max_globals=P if glob is not None else None,
                sinks=sinks), state

        return self._run(x, lambda i: attend, deterministic)

    def windowed(self, tokens: Array, *, num_sink_slots: int, window: int,
                 padding_mask: Optional[Array] = None) -> Array:
        """Logits ``[B, T, V]`` a stream with G sink slots and W recent tokens produces.

        The oracle of :func:`globalattn.modules.decode.stream_logits` (exact up to
        float rounding). The stream is the P sink tokens followed by ``tokens``,
        so G counts the sink tokens too (G = P keeps exactly the learned sinks).
        """
        x, pad = self._stream_inputs(tokens, padding_mask)

        def attend(q, k, v, sinks, state):
            return streaming.sink_window_attention(
                q, k, v, num_sink_slots=num_sink_slots, window=window, base=self.rope_base,
                sinks=sinks, padding_mask=pad), state

        return self._run(x, lambda i: attend, deterministic=True)

    def attention_weights(self, tokens: Array, padding_mask: Optional[Array] = None) -> Array:
        """Attention maps float32 ``[L, B, N, P+T, P+T]`` of the dense causal forward.

        Rows sum to 1 minus the mass on the sink-logit column (if any). Computed
        at true positions with full causal attention, whatever ``window`` is.
        """
        x, pad = self._stream_inputs(tokens, padding_mask)
        maps: List[Array] = []

        def attend(q, k, v, sinks, state):
            out, w = streaming.sink_window_attention(
                q, k, v, num_sink_slots=0, window=None, base=self.rope_base, sinks=sinks,
                padding_mask=pad, return_weights=True)
            maps.append(w)
            return out, state

        self._run(x, lambda i: attend, deterministic=True)
        return jnp.stack(maps)

    def decode(self, tokens: Array, cache: streaming.KVCache):
        """One data token per row, ``[B]`` int -> (logits float32 ``[B, V]``, cache)."""
        if tokens.ndim != 1:
            raise ValueError(f"decode takes one token per row, [B]; got shape {tokens.shape}")
        return self._decode_embedded(self.embed(tokens)[:, None], cache)

    def decode_sink(self, index: int, cache: streaming.KVCache) -> streaming.KVCache:
        """Feeds learned sink token ``index`` (a Python int < P) to every row; returns the cache."""
        if not 0 <= index < self.num_sink_tokens:
            raise ValueError(f"sink index {index} out of range for num_sink_tokens="
                             f"{self.num_sink_tokens}")
        B = cache.keys.shape[1]
        x = jnp.broadcast_to(self.sink_tokens[index].astype(self.dtype), (B, 1, self.d_model))
        _, cache = self._decode_embedded(x, cache)
        return cache

    def _decode_embedded(self, x: Array, cache: streaming.KVCache):
        L = self.num_layers
        if cache.keys.shape[0] != L or cache.keys.shape[3:] != (self.num_heads, self.head_dim):
            raise ValueError(f"cache keys {cache.keys.shape} do not fit [L={L}, B, S, "
                             f"N={self.num_heads}, H={self.head_dim}]")
        G, W = cache.num_sink_slots, cache.window
        new_keys, new_values = [], []
        for i, block in enumerate(self.blocks):
            def attend(q, k, v, sinks, layer):
                out, ks, vs = streaming.cache_attention(
                    q[:, 0], k[:, 0], v[:, 0], layer[0], layer[1], cache.length,
                    num_sink_slots=G, window=W, base=self.rope_base, sinks=sinks)
                return out[:, None], (ks, vs)

            x, (ks, vs) = block(x, deterministic=True, attend=attend,
                                state=(cache.keys[i], cache.values[i]))
            new_keys.append(ks)
            new_values.append(vs)
        logits = self.head(self.ln_final(x))[:, 0].astype(jnp.float32)
        cache = cache.replace(keys=jnp.stack(new_keys), values=jnp.stack(new_values),
                              length=cache.length + 1)
        return logits, cache
