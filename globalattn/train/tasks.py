"""Losses and metrics per task kind, as weighted sums.

Every function takes the model output, the batch and per-example weights
``w`` float32 ``[B]`` (1 for real examples, 0 for the padding examples that
fill the last evaluation batch) and returns ``{name: (sum, count)}`` of
float32 scalars. Sums over batches and devices stay exact, and ``sum / count``
is the metric, so a padded example never counts and never shifts a mean.

* classification (``label`` [B]; logits [B, C]): ``loss`` (cross-entropy),
  ``accuracy``.
* token (``labels`` [B, T], ``label_mask`` [B, T]; logits [B, T, C]): ``loss``
  and ``accuracy`` per labelled token; ``sequence_accuracy``: all labelled
  tokens of an example right (examples with at least one label).
* span (``start``, ``end`` [B]; (start, end) logits [B, T] each): ``loss`` =
  mean of start and end cross-entropy; ``exact_match`` (both argmaxes right),
  ``start_accuracy``, ``end_accuracy``.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Sums = dict[str, tuple[Array, Array]]

__all__ = ["KINDS", "LOSS", "metric_sums", "means"]

KINDS = ("classification", "token", "span")
LOSS = "loss"  # the metric the train step minimises: sum / count


def _classification(logits: Array, batch: Mapping[str, Array], w: Array) -> Sums:
    label = batch["label"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    n = jnp.sum(w)
    right = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
    return {"loss": (jnp.sum(w * ce), n), "accuracy": (jnp.sum(w * right), n)}


def _token(logits: Array, batch: Mapping[str, Array], w: Array) -> Sums:
    labels = batch["labels"]
    m = batch["label_mask"].astype(jnp.float32) * w[:, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    right = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    n = jnp.sum(m)
    has_label = (jnp.sum(m, -1) > 0).astype(jnp.float32)
    all_right = jnp.all((right > 0) | (m == 0), axis=-1).astype(jnp.float32) * has_label
    return {"loss": (jnp.sum(m * ce), n), "accuracy": (jnp.sum(m * right), n),
            "sequence_accuracy": (jnp.sum(all_right), jnp.sum(has_label))}


def _span(logits: tuple[Array, Array], batch: Mapping[str, Array], w: Array) -> Sums:
    start_logits, end_logits = logits
    ce = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(start_logits, batch["start"])
                + optax.softmax_cross_entropy_with_integer_labels(end_logits, batch["end"]))
    s_right = jnp.argmax(start_logits, -1) == batch["start"]
    e_right = jnp.argmax(end_logits, -1) == batch["end"]
    n = jnp.sum(w)
    f = lambda x: jnp.sum(w * x.astype(jnp.float32))  # noqa: E731
    return {"loss": (jnp.sum(w * ce), n), "exact_match": (f(s_right & e_right), n),
            "start_accuracy": (f(s_right), n), "end_accuracy": (f(e_right), n)}


_BY_KIND = {"classification": _classification, "token": _token, "span": _span}


def metric_sums(kind: str, outputs: Any, batch: Mapping[str, Array], weights: Array) -> Sums:
    """``{name: (weighted sum, weight)}`` for a task kind (see module docstring)."""
    if kind not in _BY_KIND:
        raise ValueError(f"unknown task kind {kind!r}; known: {KINDS}")
    return _BY_KIND[kind](outputs, batch, weights.astype(jnp.float32))


def means(sums: Mapping[str, tuple[Any, Any]]) -> dict[str, Any]:
    """``{name: sum / max(count, 1)}`` (0 when nothing was counted)."""
    return {k: s / jnp.maximum(n, 1.0) for k, (s, n) in sums.items()}
