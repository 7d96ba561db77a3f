"""Optimizer: AdamW with linear warmup + cosine decay and global-norm clipping."""
from __future__ import annotations

import jax
import ml_collections
import optax

__all__ = ["learning_rate_schedule", "make_optimizer", "decay_mask"]


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int,
                           learning_rate: float | jax.Array | None = None) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over ``warmup_steps``, then cosine to
    ``learning_rate * end_learning_rate_factor`` at ``num_train_steps``.

    ``learning_rate`` (default ``optim.learning_rate``) may be a traced scalar:
    the schedule is ``peak * shape(step)`` with a peak-1 shape, so one compiled
    program can train variants with different learning rates (experiments/ablate.py)
    with exactly the arithmetic of a separate run.
    """
    peak = optim.learning_rate if learning_rate is None else learning_rate
    shape = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=1.0, warmup_steps=optim.warmup_steps,
        # optax counts decay_steps from 0, warmup included.
        decay_steps=max(num_train_steps, optim.warmup_steps + 1),
        end_value=optim.end_learning_rate_factor)
    return lambda count: peak * shape(count)


def decay_mask(params) -> object:
    """True for matrices (kernels, embeddings); biases and LayerNorm scales are not decayed."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_train_steps: int,
                   learning_rate: float | jax.Array | None = None
                   ) -> optax.GradientTransformation:
    """Clip (if ``grad_clip_norm > 0``), then AdamW on the warmup-cosine schedule.

    ``learning_rate``: the peak (default ``optim.learning_rate``; may be traced,
    see :func:`learning_rate_schedule`). The optimizer state does not depend on it.

    Non-finite steps are not handled here (cf. ``optax.apply_if_finite``, which
    eventually applies a NaN update): the train step skips them explicitly.
    """
    adamw = optax.adamw(learning_rate_schedule(optim, num_train_steps, learning_rate), b1=optim.b1,
                        b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask)
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw
