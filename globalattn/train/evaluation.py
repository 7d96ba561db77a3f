"""One evaluation: :func:`evaluate`, used by the training loop and by the ablation.

Evaluation is a sum: the eval step returns ``{metric: (weighted sum, weight)}``
per batch (padding examples carry weight 0), the sums are accumulated in
float64 on the host over every batch of a split, and each metric is
``sum / max(weight, 1)``. The same code serves one model (scalar sums) and K
vmapped variants of an ablation (sums of shape ``[K]``, one result per variant).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from globalattn.train import inputs
from globalattn.train.config import RunSpec

__all__ = ["evaluate"]


def evaluate(eval_step: Callable, params: Any, config: ml_collections.ConfigDict, spec: RunSpec,
             split: str, sharding: NamedSharding | None = None, *, args: Sequence[Any] = ()
             ) -> dict[str, float] | list[dict[str, float]]:
    """Metrics over every example of ``split``.

    Args:
      eval_step: ``eval_step(params, batch, *args) -> {name: (sum, weight)}``, the
        sums scalars (one model) or ``[K]`` arrays (K vmapped variants).
      params: what ``eval_step`` takes first.
      config, spec: the experiment config and its validated RunSpec.
      split: a split of ``config.data``.
      sharding: where a batch goes: this process's rows of a global array
        (the training loop's data-parallel sharding), or None for
        ``jax.device_put`` (one device, e.g. the ablation program).
      args: further arguments of ``eval_step`` (the ablation's active global counts).

    Returns:
      ``{name: mean, 'num_examples': n}`` for scalar sums, or a list of K such
      dicts for ``[K]`` sums.

    Raises:
      RuntimeError: the evaluated weights do not add up to the split's size (an
        example was dropped or counted twice).
    """
    totals: dict[str, np.ndarray] = {}
    examples = 0.0
    for np_batch in inputs.eval_batches(config, spec, split):
        examples += float(np_batch["weights"].sum())
        batch = (jax.device_put(np_batch) if sharding is None
                 else inputs.to_global(np_batch, sharding))
        sums = jax.device_get(eval_step(params, batch, *args))
        for name, (s, n) in sums.items():
            acc = totals.setdefault(name, np.zeros((2,) + np.shape(s), np.float64))
            acc[0] += np.asarray(s, np.float64)
            acc[1] += np.asarray(n, np.float64)
    if jax.process_count() > 1:
        examples = float(np.sum(multihost_utils.process_allgather(np.float32(examples))))
    # The weights count real examples: a mismatch means an example was dropped or doubled.
    if int(round(examples)) != spec.split_sizes[split]:
        raise RuntimeError(f"evaluated {examples} examples of {config.data.name}/{split}, but "
                           f"the split has {spec.split_sizes[split]}")
    n_examples = int(round(examples))
    means = {name: acc[0] / np.maximum(acc[1], 1.0) for name, acc in totals.items()}
    if all(np.ndim(m) == 0 for m in means.values()):
        return {**{name: float(m) for name, m in means.items()}, "num_examples": n_examples}
    k = len(next(iter(means.values())))
    return [{**{name: float(m[i]) for name, m in means.items()}, "num_examples": n_examples}
            for i in range(k)]
