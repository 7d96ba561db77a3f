"""The jitted train and eval steps.

``train_step(state, batch, rng) -> (state, metrics)`` is a pure function: all
randomness is ``fold_in(rng, state.step)`` (split into the 'dropout' and
'random_blocks' streams), so a resumed run draws exactly what an unbroken run
draws. The state argument is donated.

Non-finite policy: a step whose loss, gradient norm or update norm is not
finite applies no update (params and optimizer state are kept bit-for-bit),
increments ``nonfinite_steps`` and ``consecutive_nonfinite``, and reports
``finite = 0``. The loop stops with an error after
``config.nonfinite.max_consecutive`` consecutive skips.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from globalattn.train import tasks
from globalattn.train.state import TrainState, batch_sharding

__all__ = ["make_eval_fn", "make_eval_step", "make_step_fn", "make_train_step", "model_inputs"]

Array = jax.Array
Batch = Mapping[str, Array]


def model_inputs(batch: Batch) -> tuple[Array, Array, Array]:
    """``(tokens, padding_mask, segment_ids)`` of a batch."""
    return batch["tokens"], batch["padding_mask"], batch["segment_ids"]


def _apply_fn(model: nn.Module, num_active_globals: int | None):
    def apply(params, batch: Batch, *, deterministic: bool, rngs=None):
        return model.apply({"params": params}, *model_inputs(batch),
                           num_active_globals=num_active_globals,
                           deterministic=deterministic, rngs=rngs)
    return apply


def make_step_fn(model: nn.Module, kind: str, *, inject_nonfinite_at: Sequence[int] = ()
                 ) -> Callable:
    """The unjitted ``step(state, batch, rng, *, tx, schedule, num_active_globals)``.

    What :func:`make_train_step` jits for one run, and what
    ``globalattn.train.ablation`` vmaps over variants: ``tx`` and ``schedule``
    may close over a traced learning rate and ``num_active_globals`` may be a
    traced int scalar, so one program trains variants that differ in them.
    Returns ``(new_state, metrics)`` (see :func:`make_train_step`).
    """
    poison_steps = jnp.asarray(sorted(set(inject_nonfinite_at)), jnp.int32)

    def loss_fn(params, batch, step, key, num_active_globals):
        dropout_key, blocks_key = jax.random.split(key)
        outputs = _apply_fn(model, num_active_globals)(
            params, batch, deterministic=False,
            rngs={"dropout": dropout_key, "random_blocks": blocks_key})
        sums = tasks.metric_sums(kind, outputs, batch, batch["weights"])
        loss = tasks.means(sums)[tasks.LOSS]
        if poison_steps.size:
            loss = loss * jnp.where(jnp.isin(step, poison_steps), jnp.nan, 1.0)
        return loss, sums

    def step_fn(state: TrainState, batch: Batch, rng: Array, *,
                tx: optax.GradientTransformation, schedule: optax.Schedule,
                num_active_globals=None):
        key = jax.random.fold_in(rng, state.step)
        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch, state.step, key, num_active_globals)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(
            optax.tree.norm(updates))
        # A select, not a cond: the skipped branch's NaNs never reach the kept values.
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_params = optax.apply_updates(state.params, updates)
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + skipped,
            consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
        )
        metrics = {k: v.astype(jnp.float32) for k, v in tasks.means(sums).items()}
        metrics.update(
            loss=loss, grad_norm=grad_norm,
            learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
            finite=finite.astype(jnp.float32),
            nonfinite_steps=new_state.nonfinite_steps,
            consecutive_nonfinite=new_state.consecutive_nonfinite)
        return new_state, metrics

    return step_fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, kind: str, *,
                    mesh: Mesh, state_shardings: Any, schedule: optax.Schedule,
                    num_active_globals: int | None = None,
                    inject_nonfinite_at: Sequence[int] = (), rules: Any = None) -> Callable:
    """The jitted ``train_step(state, batch, rng) -> (state, metrics)``.

    Args:
      model, tx: the Linen model and optimizer.
      kind: task kind (see :mod:`globalattn.train.tasks`).
      mesh, state_shardings: where the state lives; batches are split over 'data'.
      schedule: learning rate by step, reported as ``learning_rate``.
      num_active_globals: static count of active global slots (None = all).
      inject_nonfinite_at: steps (``state.step`` values) whose loss is multiplied
        by NaN, to exercise the non-finite policy.
      rules: logical-axis rules (None = the defaults); they place the batch.

    The batch needs 'tokens', 'padding_mask', 'segment_ids', the task's labels
    and 'weights' float32 [B]. ``metrics`` holds float32 scalars: ``loss`` and
    the task metrics (weighted means over the batch), ``grad_norm``,
    ``learning_rate``, ``finite`` (1 or 0) and the two non-finite counters.
    """
    step_fn = make_step_fn(model, kind, inject_nonfinite_at=inject_nonfinite_at)
    traces = [0]

    def train_step(state: TrainState, batch: Batch, rng: Array):
        traces[0] += 1  # Python side effect: runs once per trace, not per step
        return step_fn(state, batch, rng, tx=tx, schedule=schedule,
                       num_active_globals=num_active_globals)

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(train_step, donate_argnums=(0,),
                     in_shardings=(state_shardings, batch_sharding(mesh, rules), replicated),
                     out_shardings=(state_shardings, replicated))

    def run(state: TrainState, batch: Batch, rng: Array):
        # No nn.logical_axis_rules context here: under one, flax's apply-time shape check
        # of DenseGeneral kernels with 3 logical axes applies a rank-3 constraint to the
        # rank-2 reshaped kernel and fails. Parameter and batch shardings (in_shardings)
        # are enough for the compiler to propagate activation shardings.
        with jax.set_mesh(mesh):
            return jitted(state, batch, rng)

    run.jitted = jitted
    run.num_traces = lambda: traces[0]  # tests: one compile per config and shape
    return run


def make_eval_fn(model: nn.Module, kind: str) -> Callable:
    """The unjitted ``eval_fn(params, batch, *, num_active_globals=None) -> {name: (sum, count)}``
    (deterministic; ``num_active_globals`` may be traced, as in :func:`make_step_fn`)."""

    def eval_fn(params, batch: Batch, *, num_active_globals=None):
        outputs = _apply_fn(model, num_active_globals)(params, batch, deterministic=True)
        return tasks.metric_sums(kind, outputs, batch, batch["weights"])

    return eval_fn


def make_eval_step(model: nn.Module, kind: str, *, mesh: Mesh, params_shardings: Any,
                   num_active_globals: int | None = None, rules: Any = None) -> Callable:
    """The jitted ``eval_step(params, batch) -> {name: (sum, count)}`` (deterministic)."""
    eval_fn = make_eval_fn(model, kind)

    def eval_step(params, batch: Batch):
        return eval_fn(params, batch, num_active_globals=num_active_globals)

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding(mesh, rules)),
                     out_shardings=replicated)

    def run(params, batch: Batch):
        with jax.set_mesh(mesh):  # no axis-rules context: see make_train_step
            return jitted(params, batch)

    return run
