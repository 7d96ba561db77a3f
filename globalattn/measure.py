"""Measurements the results tables report next to accuracies: cost, size, baselines, sinks.

Pattern counting on explicit positions is :mod:`globalattn.analytics`; this
module measures *built models and data sets*:

* :func:`attention_pairs` / :func:`density` -- (query, key) pairs one forward
  pass attends over all its attention ops, on the pattern the built model uses;
* :func:`count_params` -- parameters of the model a config builds;
* :func:`padding_masks`, :func:`majority_baseline` -- facts about a data split;
* :func:`beyond_reach_accuracy` -- a trained classifier's accuracy when every
  real token its readout cannot reach through the window is replaced by noise
  (does a model with more reach use it?);
* :func:`reachable_queries` -- MQAR queries whose value a window + first-n
  globals pattern can read directly;
* :func:`streaming_perplexity`, :func:`sink_metric` -- a causal LM streamed
  through a fixed KV cache, and Gu et al. 2024's attention-sink metric.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from globalattn import analytics
from globalattn import data as data_lib
from globalattn.modules import build_model, decode
from globalattn.ops.dense import global_local_mask

__all__ = ["attention_pairs", "beyond_reach_accuracy", "count_params", "density",
           "majority_baseline", "padding_masks", "reachable_queries", "sink_metric",
           "streaming_perplexity"]


def _spec(config: ml_collections.ConfigDict):
    from globalattn.train.config import validate_config  # train imports this module's peers

    return validate_config(config)


def padding_masks(config: ml_collections.ConfigDict, split: str = "validation") -> np.ndarray:
    """bool ``[E, T]``: the real tokens of every example of a split (CLS included)."""
    spec = _spec(config)
    cls = int(bool(config.data.prepend_cls))
    source = data_lib.data_source(config.data.name, split, config.data.config,
                                  config.data.data_dir)
    lengths = np.array([len(source[i]["tokens"]) + cls for i in range(len(source))])
    return np.arange(spec.seq_len)[None, :] < lengths[:, None]


def attention_pairs(config: ml_collections.ConfigDict, padding_mask: np.ndarray) -> np.ndarray:
    """Pairs one forward attends over all its attention ops, per row of ``padding_mask [E, T]``.

    Encoders: the built model's strategy gives the global / padding masks (prepended
    tokens included), counted by ``analytics.allowed_pairs``, or with random blocks
    (BigBird, its evaluation draw) as ``global_local_mask`` per layer, mean over heads.
    Full attention: ``L n**2``. Perceiver: ``n M + M**2`` per latent layer + decoder.
    """
    spec = _spec(config)
    m = spec.model_config
    mask = np.asarray(padding_mask, bool)
    if mask.ndim != 2 or mask.shape[1] != spec.seq_len:
        raise ValueError(f"padding_mask must be [E, T={spec.seq_len}], got {mask.shape}")
    n = mask.sum(-1).astype(np.float64)
    active = config.num_active_globals
    if m.arch == "perceiver":
        M = m.perceiver.num_latents if active is None else active
        readout = M if m.head == "classify" and m.pooling == "cls" else n * M
        return n * M + m.perceiver.num_latent_layers * M * M + readout
    if m.attention_schedule == "full":
        return m.num_layers * n ** 2
    if m.attention_schedule != "global_local":
        raise ValueError(f"attention_schedule {m.attention_schedule!r} is not counted here")
    strategy = build_model(m).strategy.clone(parent=None)
    E, T = mask.shape
    gt, _ = strategy.init_with_output(
        jax.random.key(0), jnp.zeros((E, T, m.d_model)), jnp.asarray(mask),
        jnp.zeros((E, T), jnp.int32), num_active=active, deterministic=True)
    window = strategy.window_override or m.window
    glob, real = np.asarray(gt.global_mask), np.asarray(gt.padding_mask)
    if gt.random_blocks is None:
        per_layer = [analytics.allowed_pairs(real.shape[1], local_window_size=window,
                                             global_positions=glob[e], padding_mask=real[e])
                     for e in range(E)]
        return m.num_layers * np.asarray(per_layer, np.float64)
    total = np.zeros(E)
    for blocks in np.asarray(gt.random_blocks):  # one layer: [B or 1, N, nb, r]
        dense = np.asarray(global_local_mask(
            real.shape[1], local_window_size=window, global_mask=jnp.asarray(glob),
            padding_mask=jnp.asarray(real), random_blocks=jnp.asarray(blocks),
            block_size=strategy.block_size))
        dense = dense[:, None] if dense.ndim == 3 else dense  # [E, N, T, T]
        total += dense.sum((-1, -2)).mean(-1)
    return total


def density(config: ml_collections.ConfigDict, padding_mask: np.ndarray,
            ref_layers: int = 0) -> tuple[float, float]:
    """(mean pairs per forward, mean of pairs / (L n**2)); L = ref_layers or the model's."""
    pairs = attention_pairs(config, padding_mask)
    n = np.asarray(padding_mask, bool).sum(-1).astype(np.float64)
    layers = ref_layers or config.model.num_layers
    return float(pairs.mean()), float(np.mean(pairs / (layers * n ** 2)))


def count_params(config: ml_collections.ConfigDict) -> int:
    """Parameters of the model ``config`` builds (from shapes; nothing is initialised)."""
    from globalattn.train.state import init_inputs

    spec = _spec(config)
    model = build_model(spec.model_config)
    shapes = jax.eval_shape(
        lambda k: nn.unbox(model.init({"params": k}, *init_inputs(spec.seq_len))["params"]),
        jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def majority_baseline(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The train split's most frequent label and its accuracy on every split."""
    labels = {}
    for split in ("train", "validation", "test"):
        src = data_lib.data_source(config.data.name, split, config.data.config,
                                   config.data.data_dir)
        labels[split] = np.array([int(src[i]["label"]) for i in range(len(src))])
    top = int(np.bincount(labels["train"]).argmax())
    return {"label": top, **{s: float(np.mean(v == top)) for s, v in labels.items()}}


def beyond_reach_accuracy(config: ml_collections.ConfigDict, params: Any, *, reach: int,
                          split: str = "test", seed: int = 0, batch_size: int = 200
                          ) -> dict[str, float]:
    """Accuracy of a trained CLS classifier with and without the tokens beyond ``reach``.

    Every real token at a position > ``reach`` (CLS at 0 included in the count)
    is replaced by a token drawn from the split's own token frequencies at those
    positions (the same draw for every model: ``seed``); padding stays padding.
    A model whose accuracy does not drop uses nothing beyond ``reach`` -- what a
    window of that reach already sees.

    Returns:
      ``{'accuracy', 'accuracy_noised', 'changed'}``: accuracy on the split, on
      its noised copy, and the fraction of predictions the noise changed.
    """
    spec = _spec(config)
    model = build_model(spec.model_config)
    if not 0 <= reach < spec.seq_len:
        raise ValueError(f"reach={reach} must be in [0, T={spec.seq_len})")
    loader = data_lib.make_loader(
        config.data.name, split, batch_size, config=config.data.config,
        data_dir=config.data.data_dir, shuffle=False, num_epochs=1, drop_remainder=False,
        pad_to=spec.seq_len, prepend_cls=bool(config.data.prepend_cls))
    batches = list(loader)
    tokens = np.concatenate([b["tokens"] for b in batches])
    mask = np.concatenate([b["padding_mask"] for b in batches]).astype(bool)
    labels = np.concatenate([b["label"] for b in batches])
    far = mask & (np.arange(tokens.shape[1])[None, :] > reach)
    ids, counts = np.unique(tokens[far], return_counts=True)
    rng = np.random.default_rng(seed)
    noised = tokens.copy()
    if ids.size:
        noised[far] = rng.choice(ids, size=int(far.sum()), p=counts / counts.sum())
    predict = jax.jit(lambda p, t, m: jnp.argmax(
        model.apply({"params": p}, t, m, jnp.zeros_like(t)), -1))

    def preds(t: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(predict(params, t[i:i + batch_size],
                                                  mask[i:i + batch_size]))
                               for i in range(0, len(t), batch_size)])

    clean, noisy = preds(tokens), preds(noised)
    return {"accuracy": float(np.mean(clean == labels)),
            "accuracy_noised": float(np.mean(noisy == labels)),
            "changed": float(np.mean(clean != noisy))}


def reachable_queries(source: Any, *, num_globals: int, reach: int) -> float:
    """MQAR: fraction of query tokens whose pair's value position is global or within ``reach``.

    ``source`` yields examples with ``tokens``, ``labels`` and ``label_mask``. The value
    of a queried pair is the first earlier token equal to the query's label; a query at
    p reads it directly if ``p - value_pos <= reach`` (the window over the layers) or
    ``value_pos < num_globals`` (a global slot).
    """
    ok = total = 0
    for i in range(len(source)):
        ex = source[i]
        tokens, labels, mask = ex["tokens"], ex["labels"], ex["label_mask"].astype(bool)
        for p in np.flatnonzero(mask):
            hits = np.flatnonzero(tokens[:p] == labels[p])
            if hits.size == 0:
                raise ValueError(f"example {i}: the label {labels[p]} of query {p} does not "
                                 "occur before it")
            ok += bool(hits[0] < num_globals or p - hits[0] <= reach)
            total += 1
    return ok / total


def streaming_perplexity(model: nn.Module, params: Any, streams: np.ndarray, *,
                         initial_tokens: int, cache_size: int) -> float:
    """Perplexity of ``streams [B, L]`` decoded through a cache of x + (C - x) tokens.

    Every token after the first is predicted from what the cache holds
    (StreamingLLM's setting); the mean is over all ``B * (L - 1)`` predictions.
    """
    if not 0 <= initial_tokens < cache_size:
        raise ValueError(f"initial_tokens={initial_tokens} must be in [0, cache_size="
                         f"{cache_size})")
    tokens = jnp.asarray(streams, jnp.int32)
    logits = decode.stream_logits(model, params, tokens, num_sink_slots=initial_tokens,
                                  window=cache_size - initial_tokens)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    return float(jnp.exp(jnp.mean(nll)))


def sink_metric(model: nn.Module, params: Any, tokens: np.ndarray, *, threshold: float,
                key_index: int = 0, local: int = 8) -> dict[str, Any]:
    """Gu et al. 2024's sink metric on dense causal forwards of ``tokens [B, T]``.

    ``alpha[l, h]`` = attention to stream token ``key_index`` (the first token: the
    learned sink token when the model has one), averaged over every query that can
    see it and over the B sequences. The metric is the fraction of layer-heads with
    ``alpha > threshold``.

    Where the attention goes instead: ``local_mass`` is the attention on the
    ``local`` most recent keys (the query's own included), averaged the same way
    over every query and layer-head.

    Returns:
      ``{'metric', 'alpha' [L][N], 'mean_alpha', 'local_mass', 'sink_logit_mass'}``;
      the last is the mean attention mass on the sink-logit column (0 without sink
      logits).
    """
    if not isinstance(local, int) or local < 1:
        raise ValueError(f"local must be an int >= 1, got {local!r}")
    maps = jax.jit(lambda p, t: model.apply({"params": p}, t, method="attention_weights"))
    w = maps(params, jnp.asarray(tokens, jnp.int32))  # [L, B, N, S, S]
    alpha = jnp.mean(w[..., key_index:, key_index], axis=(1, 3))  # [L, N]
    S = w.shape[-1]
    offset = jnp.arange(S)[:, None] - jnp.arange(S)[None, :]  # query - key
    band = (offset >= 0) & (offset < local)
    local_mass = jnp.mean(jnp.sum(jnp.where(band, w, 0.0), axis=-1))
    column = jnp.mean(1.0 - jnp.sum(w, axis=-1))
    alpha = np.asarray(alpha)
    return {"metric": float(np.mean(alpha > threshold)), "alpha": alpha.tolist(),
            "mean_alpha": float(alpha.mean()), "local_mass": float(local_mass),
            "sink_logit_mass": float(column)}
