"""K training runs in ONE compiled program: ``jax.vmap`` over variants of a config.

A variant is ``(num_active_globals, seed, learning_rate)``:

* ``num_active_globals`` -- active slots of a padded-capacity strategy
  (``first``, ``periodic``, ``extra``, Perceiver latents, ...). The model keeps
  its static capacity G; inactive slots are masked out of every row and column,
  so variant n computes what a run with ``num_active_globals=n`` computes.
* ``seed`` -- initialisation and the per-step dropout / random-block keys.
* ``learning_rate`` -- the peak of the warmup-cosine schedule (traced, see
  :func:`globalattn.train.optim.learning_rate_schedule`).

All variants see the same batches, in the order of ``data.shuffle_seed`` (None:
the config's ``seed``). Variant k is therefore the run
:func:`variant_config` describes, step for step: same initial key
(``split(key(seed))``), same ``fold_in(key, step)`` randomness, same schedule,
same non-finite policy (tests/test_ablation.py compares them with
:func:`globalattn.train.train_and_evaluate`). One difference on purpose: a
variant that reaches ``nonfinite.max_consecutive`` skipped steps is reported
as diverged instead of stopping the other variants.

The program runs on one device and warns when ``config.mesh`` asks for more
(the variant axis is a batch axis, so a pod could shard it like data; not
built yet).
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from globalattn.train import inputs
from globalattn.train.evaluation import evaluate
from globalattn.train.metrics import _duration
from globalattn.train.config import RunSpec, apply_overrides, validate_config
from globalattn.train.optim import learning_rate_schedule, make_optimizer
from globalattn.train.state import init_state
from globalattn.train.step import make_eval_fn, make_step_fn

__all__ = ["AblationResult", "Variant", "grid", "time_steps", "train_variants", "variant_config"]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training run of an ablation."""

    num_active_globals: int
    seed: int
    learning_rate: float

    @property
    def name(self) -> str:
        return f"g{self.num_active_globals}_s{self.seed}_lr{self.learning_rate:g}"


def grid(num_active_globals: Sequence[int], seeds: Sequence[int],
         learning_rates: Sequence[float]) -> list[Variant]:
    """The product of the three axes, learning rate outermost, global count innermost."""
    for name, axis in (("num_active_globals", num_active_globals), ("seeds", seeds),
                       ("learning_rates", learning_rates)):
        if not len(axis):
            raise ValueError(f"{name} is empty")
    return [Variant(int(n), int(s), float(lr)) for lr in learning_rates for s in seeds
            for n in num_active_globals]


def variant_config(config: ml_collections.ConfigDict, variant: Variant
                   ) -> ml_collections.ConfigDict:
    """The single-run config that ``variant`` of an ablation of ``config`` trains."""
    shuffle = config.seed if config.data.shuffle_seed is None else config.data.shuffle_seed
    return apply_overrides(config, {
        "num_active_globals": variant.num_active_globals, "seed": variant.seed,
        "optim.learning_rate": variant.learning_rate, "data.shuffle_seed": shuffle})


def _check_variants(variants: Sequence[Variant], capacity: int) -> None:
    if not variants:
        raise ValueError("no variants to train")
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variants {dupes} appear more than once")
    bad = [v.name for v in variants if not 0 <= v.num_active_globals <= capacity]
    if bad:
        raise ValueError(f"variants {bad}: num_active_globals outside [0, capacity G={capacity}] "
                         "of the config's model (raise model.strategy.num_globals)")
    bad = [v.name for v in variants if not 0 <= v.seed < 2**31]
    if bad:
        raise ValueError(f"variants {bad}: seed outside [0, 2**31)")
    bad = [v.name for v in variants if not (math.isfinite(v.learning_rate)
                                            and v.learning_rate > 0)]
    if bad:
        raise ValueError(f"variants {bad}: learning_rate must be a finite number > 0")


@dataclasses.dataclass
class AblationResult:
    """What :func:`train_variants` measured.

    Attributes:
      variants: in program order.
      train: ``{metric: float32 [steps, K]}`` per-step train metrics (loss,
        accuracy, grad_norm, learning_rate, finite, ...).
      final: per variant, ``{'<split>/<metric>': value}`` after the last step,
        plus ``nonfinite_steps`` and ``diverged``.
      compile_s, train_s: seconds to compile the vmapped step and to run all steps.
      spec: the validated run spec of the config.
    """

    variants: list[Variant]
    train: dict[str, np.ndarray]
    final: list[dict[str, Any]]
    compile_s: float
    train_s: float
    spec: RunSpec


def _step_program(config: ml_collections.ConfigDict, spec: RunSpec):
    """``(init_one, step_one, eval_one)``: single-variant functions to vmap."""
    model = spec.model
    steps = config.num_train_steps
    tx = make_optimizer(config.optim, steps)  # the state's structure does not depend on lr
    step_fn = make_step_fn(model, spec.meta.kind,
                           inject_nonfinite_at=tuple(config.nonfinite.inject_at_steps))
    eval_fn = make_eval_fn(model, spec.meta.kind)

    def init_one(seed):
        init_key, train_key = jax.random.split(jax.random.key(seed))
        return init_state(model, tx, spec.seq_len, init_key), train_key

    def step_one(state, batch, rng, lr, num_active):
        return step_fn(state, batch, rng, tx=make_optimizer(config.optim, steps, lr),
                       schedule=learning_rate_schedule(config.optim, steps, lr),
                       num_active_globals=num_active)

    def eval_one(params, batch, num_active):
        return eval_fn(params, batch, num_active_globals=num_active)

    return init_one, step_one, eval_one


def _program_inputs(init_one, step_one, variants: Sequence[Variant]):
    """``(states, keys, lrs, num_active, vstep)``: the stacked per-variant inputs and the
    jitted vmapped step (state donated) of one K-variant program."""
    seeds = jnp.asarray([v.seed for v in variants], jnp.uint32)
    lrs = jnp.asarray([v.learning_rate for v in variants], jnp.float32)
    num_active = jnp.asarray([v.num_active_globals for v in variants], jnp.int32)
    states, keys = jax.jit(jax.vmap(init_one))(seeds)
    vstep = jax.jit(jax.vmap(step_one, in_axes=(0, None, 0, 0, 0)), donate_argnums=(0,))
    return states, keys, lrs, num_active, vstep


def train_variants(config: ml_collections.ConfigDict, variants: Sequence[Variant], *,
                   eval_splits: Sequence[str] | None = None,
                   print_fn: Callable[[str], None] | None = print) -> AblationResult:
    """Trains every variant of ``config`` at once and evaluates them.

    Args:
      config: an experiment config (its ``seed``, ``num_active_globals`` and
        ``optim.learning_rate`` are replaced per variant).
      variants: the runs (see :func:`grid`).
      eval_splits: default ``config.data.final_eval_splits``.
      print_fn: progress lines every ``config.log_every`` steps (None: silent): the
        loss of each variant, the program's steps/s and the ETA of the remaining
        training steps of the whole K-variant program (timed from after its
        compilation; the final evaluation is not included).

    Raises:
      ValueError: an invalid config or variant list, naming the values.
    """
    if jax.process_count() > 1:
        raise ValueError(f"ablations run in one process; this job has {jax.process_count()}")
    spec = validate_config(config)
    variants = list(variants)
    _check_variants(variants, spec.capacity)
    if math.prod(spec.mesh_shape.values()) > 1:
        warnings.warn(f"the ablation program runs on one device; config.mesh "
                      f"{spec.mesh_shape} is not used (set mesh.data=1 to silence this)",
                      stacklevel=2)
    init_one, step_one, eval_one = _step_program(config, spec)
    states, keys, lrs, num_active, vstep = _program_inputs(init_one, step_one, variants)
    veval = jax.jit(jax.vmap(eval_one, in_axes=(0, None, 0)))

    batch_size = config.batch_size
    shuffle = config.seed if config.data.shuffle_seed is None else config.data.shuffle_seed
    train_iter = inputs.make_train_iterator(apply_overrides(config, {"data.shuffle_seed": shuffle}))
    first = inputs.with_weights(next(train_iter), batch_size)
    t = time.perf_counter()
    compiled = vstep.lower(states, first, keys, lrs, num_active).compile()
    compile_s = time.perf_counter() - t

    history: list[dict[str, np.ndarray]] = []
    pending = None
    t = time.perf_counter()
    batch = first
    for step in range(1, config.num_train_steps + 1):
        states, metrics = compiled(states, jax.device_put(batch), keys, lrs, num_active)
        if pending is not None:  # read one step late: the device stays busy
            history.append(jax.device_get(pending))
        pending = metrics
        if print_fn is not None and (step % config.log_every == 0
                                     or step == config.num_train_steps):
            history.append(jax.device_get(pending))
            pending = None
            loss = " ".join(f"{x:.3f}" for x in history[-1]["loss"])
            rate = step / (time.perf_counter() - t)  # t: after compilation
            eta = _duration((config.num_train_steps - step) / rate)
            print_fn(f"step {step}/{config.num_train_steps}  loss per variant: {loss}  "
                     f"({rate:.2f} steps/s of all {len(variants)} variants; ETA {eta} for the "
                     f"whole {len(variants)}-variant program's training)")
        if step < config.num_train_steps:
            batch = inputs.with_weights(next(train_iter), batch_size)
    if pending is not None:
        history.append(jax.device_get(pending))
    jax.block_until_ready(states)
    train_s = time.perf_counter() - t
    train = {k: np.stack([h[k] for h in history]).astype(np.float32) for k in history[0]}

    max_run = _longest_nonfinite_run(train["finite"])
    final = [{"nonfinite_steps": int(train["nonfinite_steps"][-1, k]),
              "diverged": bool(max_run[k] >= config.nonfinite.max_consecutive)}
             for k in range(len(variants))]
    for split in (config.data.final_eval_splits if eval_splits is None else eval_splits):
        per_variant = evaluate(veval, states.params, config, spec, split, args=(num_active,))
        for k, metrics in enumerate(per_variant):
            final[k].update({f"{split}/{name}": value for name, value in metrics.items()})
    return AblationResult(variants=variants, train=train, final=final, compile_s=compile_s,
                          train_s=train_s, spec=spec)


def _longest_nonfinite_run(finite: np.ndarray) -> np.ndarray:
    """[steps, K] 0/1 -> the longest run of consecutive 0s per variant."""
    best = np.zeros(finite.shape[1], int)
    run = np.zeros(finite.shape[1], int)
    for row in finite:
        run = np.where(row > 0, 0, run + 1)
        best = np.maximum(best, run)
    return best


def time_steps(config: ml_collections.ConfigDict, variants: Sequence[Variant], steps: int,
               *, repeats: int = 3) -> dict[str, float]:
    """Seconds per train step: all K variants vmapped vs one variant (median of ``repeats``).

    Both programs are the same code (K variants vs 1), compiled before timing, run on
    the same batch; ``speedup = K * single / vmapped`` is what one program saves over
    running the variants one after another (compile time excluded; see ``compile_*``).
    """
    spec = validate_config(config)
    variants = list(variants)
    _check_variants(variants, spec.capacity)
    init_one, step_one, _ = _step_program(config, spec)
    batch = jax.device_put(inputs.with_weights(
        next(inputs.make_train_iterator(config)), config.batch_size))
    out: dict[str, float] = {"K": len(variants)}
    for label, group in (("vmapped", variants), ("single", variants[:1])):
        states, keys, lrs, num_active, vstep = _program_inputs(init_one, step_one, group)
        t = time.perf_counter()
        compiled = vstep.lower(states, batch, keys, lrs, num_active).compile()
        out[f"compile_{label}_s"] = time.perf_counter() - t
        states, _ = compiled(states, batch, keys, lrs, num_active)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                states, metrics = compiled(states, batch, keys, lrs, num_active)
            jax.block_until_ready((states, metrics))
            times.append((time.perf_counter() - t) / steps)
        out[f"{label}_step_s"] = float(np.median(times))
    out["speedup"] = out["K"] * out["single_step_s"] / out["vmapped_step_s"]
    return out

