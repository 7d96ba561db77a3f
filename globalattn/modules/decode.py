"""Streaming decode with a model: fresh streams, the jitted decode step, generation.

These helpers work with any Linen model exposing ``decode(tokens [B], cache)
-> (logits [B, V], cache)`` and ``decode_sink(index, cache)`` (see
:class:`globalattn.modules.lm.CausalLM`); the cache itself and the attention
over it are pure ops in :mod:`globalattn.ops.streaming`. Every row of a batch
advances in lockstep (one shared stream length).
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from globalattn.ops import validate as V
from globalattn.ops.streaming import KVCache, check_cache_shape, init_cache

Array = jax.Array

__all__ = ["generate", "make_decode_step", "new_stream", "stream_logits"]

# Jitted functions by (kind, model, shapes): Linen modules are hashable dataclasses, so
# an equal model reuses its compiled function. Oldest entries go first past the cap.
_JITTED: "collections.OrderedDict[tuple, Callable]" = collections.OrderedDict()
_MAX_JITTED = 32


def _jitted(key: tuple, make: Callable[[], Callable]) -> Callable:
    if key not in _JITTED:
        _JITTED[key] = make()
        while len(_JITTED) > _MAX_JITTED:
            _JITTED.popitem(last=False)
    return _JITTED[key]


def new_stream(model, params: Any, batch_size: int, *, num_sink_slots: int, window: int
               ) -> KVCache:
    """A cache that has already consumed the model's learned sink tokens (if any).

    ``model`` needs ``num_layers``, ``num_heads``, ``head_dim``, ``num_sink_tokens``,
    ``dtype`` and a ``decode_sink(index, cache)`` method. Jitted once per
    (model, batch, cache shape).
    """
    V.check_positive_int(batch_size, "batch_size")
    check_cache_shape(num_sink_slots, window)
    fn = _jitted(("new_stream", model, batch_size, num_sink_slots, window),
                 lambda: jax.jit(lambda p: _new_stream(model, p, batch_size, num_sink_slots,
                                                       window)))
    return fn(params)


def _new_stream(model, params, batch_size: int, num_sink_slots: int, window: int) -> KVCache:
    cache = init_cache(model.num_layers, batch_size, model.num_heads, model.head_dim,
                       num_sink_slots=num_sink_slots, window=window, dtype=model.dtype)
    for i in range(model.num_sink_tokens):
        cache = model.apply({"params": params}, i, cache, method="decode_sink")
    return cache


def make_decode_step(model) -> Callable:
    """The jitted ``step(params, cache, tokens [B] int) -> (logits [B, V] f32, cache)``.

    Traced once per (cache shape, batch): the stream length is data, not a
    shape. ``step.num_traces()`` counts traces (tests).
    """
    traces = [0]

    def step(params, cache: KVCache, tokens: Array):
        traces[0] += 1  # Python side effect: runs once per trace
        return model.apply({"params": params}, tokens, cache, method="decode")

    jitted = jax.jit(step)
    jitted.num_traces = lambda: traces[0]
    return jitted


def stream_logits(model, params: Any, tokens: Array, *, num_sink_slots: int, window: int
                  ) -> Array:
    """Feeds ``tokens [B, L]`` through a fresh stream one at a time; logits ``[B, L, V]``.

    ``logits[:, t]`` predicts ``tokens[:, t + 1]`` having seen only what the
    cache holds. A ``lax.scan`` of the decode step (one compile per shape).
    """
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
    check_cache_shape(num_sink_slots, window)

    def make() -> Callable:
        def run(params, tokens):
            cache = _new_stream(model, params, tokens.shape[0], num_sink_slots, window)

            def body(c, tok):
                logits, c = model.apply({"params": params}, tok, c, method="decode")
                return c, logits

            _, logits = jax.lax.scan(body, cache, jnp.swapaxes(tokens, 0, 1))
            return jnp.swapaxes(logits, 0, 1)

        return jax.jit(run)

    return _jitted(("stream_logits", model, num_sink_slots, window), make)(params, tokens)


@jax.jit
def _sample(logits: Array, key: Array, temperature: Array) -> Array:
    greedy = jnp.argmax(logits, axis=-1)
    drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def generate(model, params: Any, prompt: Array, num_tokens: int, *, num_sink_slots: int,
             window: int, rng: Array, temperature: float = 1.0,
             decode_step: Optional[Callable] = None) -> Iterator[np.ndarray]:
    """Streams ``num_tokens`` sampled tokens after ``prompt [B, P]`` (P >= 1), ``[B]`` at a time.

    The prompt is fed through the cache token by token (so a prompt longer
    than the window is fine); ``temperature=0`` is greedy. Memory stays
    O(G + W) however long it runs.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [B, P] with P >= 1, got shape {prompt.shape}")
    V.check_nonneg_int(num_tokens, "num_tokens")
    step = decode_step or make_decode_step(model)
    cache = new_stream(model, params, prompt.shape[0], num_sink_slots=num_sink_slots,
                       window=window)
    for t in range(prompt.shape[1]):
        logits, cache = step(params, cache, prompt[:, t])
    temp = jnp.float32(temperature)
    for i in range(num_tokens):
        token = _sample(logits, jax.random.fold_in(rng, i), temp)
        yield np.asarray(token)
        if i + 1 < num_tokens:
            logits, cache = step(params, cache, token)
