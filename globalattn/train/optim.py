"""Optimizer: AdamW with linear warmup + cosine decay and global-norm clipping."""
from __future__ import annotations

import jax
import ml_collections
import optax

__all__ = ["learning_rate_schedule", "make_optimizer", "decay_mask"]


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_train_steps: int
                           ) -> optax.Schedule:
    """0 -> ``learning_rate`` linearly over ``warmup_steps``, then cosine to
    ``learning_rate * end_learning_rate_factor`` at ``num_train_steps``."""
    peak = optim.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=optim.warmup_steps,
        # optax counts decay_steps from 0, warmup included.
        decay_steps=max(num_train_steps, optim.warmup_steps + 1),
        end_value=peak * optim.end_learning_rate_factor)


def decay_mask(params) -> object:
    """True for matrices (kernels, embeddings); biases and LayerNorm scales are not decayed."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, num_train_steps: int
                   ) -> optax.GradientTransformation:
    """Clip (if ``grad_clip_norm > 0``), then AdamW on the warmup-cosine schedule.

    Non-finite steps are not handled here (cf. ``optax.apply_if_finite``, which
    eventually applies a NaN update): the train step skips them explicitly.
    """
    adamw = optax.adamw(learning_rate_schedule(optim, num_train_steps), b1=optim.b1,
                        b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask)
    if optim.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
    return adamw
