"""The training loop as a library function: :func:`train_and_evaluate`.

``experiments/train.py`` (one run), ``experiments/main.py`` (the README
comparison) and later ablation / reproduction scripts all call it.

Workdir layout::

    <workdir>/config.json            the experiment config of the latest start
    <workdir>/checkpoints/<step>/    orbax checkpoints (see checkpoint.py)
    <workdir>/corrupt_checkpoints/   steps that failed verification, moved aside
    <workdir>/metrics.jsonl          train / eval records (see metrics.py)
    <workdir>/tensorboard/           TensorBoard events
    <workdir>/final_metrics.json     what train_and_evaluate returned

Rerunning with the same workdir resumes from the newest trustworthy
checkpoint: params, optimizer state, step, PRNG key and data position, so the
remaining steps see the same batches and random numbers as an unbroken run
(on CPU the losses agree bit for bit). A restart is checked (checkpoint
directory writable, checkpoint layout matching the config) before anything in
the workdir is written. Rerunning a finished run writes nothing (see
:func:`train_and_evaluate`).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
import warnings
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from globalattn import sharding as sharding_lib
from globalattn.train import init_from as init_from_lib
from globalattn.train import inputs
from globalattn.train.evaluation import evaluate
from globalattn.train.checkpoint import Checkpointer, PreemptionGuard, state_signature
from globalattn.train.config import RunSpec, validate_config
from globalattn.train.metrics import MetricWriter, Progress
from globalattn.train.optim import learning_rate_schedule, make_optimizer
from globalattn.train.state import batch_sharding as make_batch_sharding
from globalattn.train.state import fingerprint, make_init_fn, state_shardings
from globalattn.train.step import make_eval_step, make_train_step

__all__ = ["NonFiniteError", "evaluate", "train_and_evaluate"]

StepCallback = Callable[[int, Mapping[str, float]], None]
# Per-step values that are counters or settings, not averaged into the logged interval.
_LAST_VALUE = ("nonfinite_steps", "consecutive_nonfinite", "learning_rate")
_MAX_PROGRAMS = 4  # compiled programs kept per process (each holds its executables)


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class _Program:
    """What a config compiles to; reused by later runs in the same process."""

    mesh: Mesh
    rules: Any  # logical-axis rules (globalattn.sharding)
    model: Any
    tx: Any
    abstract_state: Any
    shardings: Any
    init: Callable
    train_step: Callable
    eval_step: Callable


_PROGRAMS: "collections.OrderedDict[str, _Program]" = collections.OrderedDict()


def _program(config: ml_collections.ConfigDict, spec: RunSpec) -> _Program:
    """Model, optimizer and jitted functions for ``config``, cached by what they depend on.

    Runs that differ only in seed, data location, logging or checkpointing (a
    resumed run, seeds of a reproduction) reuse the compiled steps instead of
    compiling them again.
    """
    mesh_shape, rules = spec.mesh_shape, spec.rules
    key = json.dumps({
        "model": spec.model_config.to_dict(), "optim": config.optim.to_dict(),
        "steps": config.num_train_steps, "kind": spec.meta.kind, "seq_len": spec.seq_len,
        "inject": list(config.nonfinite.inject_at_steps), "mesh": mesh_shape, "rules": rules,
        "num_active_globals": config.num_active_globals, "init_from": config.init_from},
        sort_keys=True, default=str)
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    mesh = sharding_lib.make_mesh(mesh_shape)
    model = spec.model
    tx = make_optimizer(config.optim, config.num_train_steps)
    abstract_state, shardings = state_shardings(model, tx, spec.seq_len, mesh, rules)
    na = config.num_active_globals
    program = _Program(
        mesh=mesh, rules=rules, model=model, tx=tx, abstract_state=abstract_state,
        shardings=shardings,
        init=make_init_fn(model, tx, spec.seq_len, shardings),
        train_step=make_train_step(
            model, tx, spec.meta.kind, mesh=mesh, state_shardings=shardings,
            schedule=learning_rate_schedule(config.optim, config.num_train_steps),
            num_active_globals=na, inject_nonfinite_at=tuple(config.nonfinite.inject_at_steps),
            rules=rules),
        eval_step=make_eval_step(model, spec.meta.kind, mesh=mesh,
                                 params_shardings=shardings.params, num_active_globals=na,
                                 rules=rules))
    _PROGRAMS[key] = program
    while len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return program


def _config_changes(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
    """Fields in which ``config`` differs from the workdir's ``config.json`` ([] if none)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f)
    return sorted(_diff(old, json.loads(config.to_json_best_effort())))


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    changed = _config_changes(workdir, config)
    if changed:
        warnings.warn(f"{workdir} was started with another config; changed fields: {changed}",
                      stacklevel=3)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2)


def _finished_result(workdir: str, step: int, params_fingerprint: str) -> dict[str, Any] | None:
    """The stored result of a run that finished at ``step`` with these params, else None."""
    path = os.path.join(workdir, "final_metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    if (result.get("step") != step or result.get("preempted")
            or result.get("fingerprint") != params_fingerprint):
        return None
    return result


def _diff(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def _stop_requested(guard: PreemptionGuard, step: int, every: int) -> bool:
    """Whether to stop now; all processes agree (they must save the same step)."""
    if jax.process_count() == 1:
        return guard.triggered
    if step % every:
        return False
    flags = multihost_utils.process_allgather(np.int32(guard.triggered))
    return bool(np.any(flags))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_callback: StepCallback | None = None) -> dict[str, Any]:
    """Trains (or resumes) ``config`` in ``workdir``, evaluates, returns the final metrics.

    Before anything is written to the workdir, the checkpoint directory is
    checked for writability and an existing checkpoint for compatibility with
    ``config`` (its state layout); ``config.json`` is written only after that.

    Rerunning a finished run (its checkpoint at ``num_train_steps`` and its
    ``final_metrics.json`` for those parameters) with the same config trains
    and evaluates nothing and writes nothing (no ``metrics.jsonl`` lines, no
    TensorBoard events file): it prints that the run is finished and returns
    the stored ``final_metrics.json`` (``wall_time_s`` is the original run's).
    With a changed config (same layout; a warning names the changed fields), or
    if the final evaluation never completed, the final evaluation is redone
    under ``config``: its earlier records at the final step are replaced in
    ``metrics.jsonl`` (never duplicated), and its TensorBoard scalars go to a
    new events file.

    Args:
      config: an experiment config (``configs/*.py``); validated first.
      workdir: output directory; an existing one is resumed.
      step_callback: called as ``f(step, metrics)`` after each train step with
        that step's host metrics (tests use it to simulate preemption).

    Returns:
      ``{'step', 'preempted', 'nonfinite_steps', 'train/<m>' (last log interval),
      '<split>/<m>' (final evaluation; absent when preempted), 'fingerprint'
      (of the final params), 'wall_time_s'}``.

    Raises:
      ValueError: invalid config (every problem listed), or a checkpoint in the
        workdir of another state layout (nothing in the workdir is changed).
      OSError: the checkpoint directory is not writable (named in the message).
      NonFiniteError: ``nonfinite.max_consecutive`` consecutive skipped steps.
    """
    start_time = time.perf_counter()
    spec = validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    program = _program(config, spec)
    mesh = program.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = make_batch_sharding(mesh, program.rules)
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    abstract = {"train_state": program.abstract_state,
                "rng": jax.ShapeDtypeStruct(jax.random.key_data(train_key).shape, np.uint32,
                                            sharding=replicated)}
    signature = state_signature(abstract)

    train_iter = inputs.make_train_iterator(config)
    # Checks before anything is written: an unwritable checkpoint directory (OSError) and
    # a checkpoint of another layout (ValueError) leave the workdir as it was.
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        max_to_keep=config.checkpoint.max_to_keep,
                        async_save=config.checkpoint.async_save)
    try:
        restored = ckpt.restore_latest(abstract, train_iter, signature)
    except BaseException:
        ckpt.close()
        raise
    total = config.num_train_steps
    if restored is not None and restored[0] == total:
        changed = _config_changes(workdir, config)
        done = None if changed else _finished_result(
            workdir, total, fingerprint(restored[1]["train_state"].params))
        if done is not None:
            ckpt.close()
            Progress(total, total).print(total, "finished", {
                "workdir": workdir, "result": "final_metrics.json (nothing rerun)"})
            return done
    _write_config(workdir, config)
    if restored is None:
        start_step = 0
        with jax.set_mesh(mesh):
            state = program.init(init_key)
        if config.init_from is not None:  # fine-tuning: the pretrained weights replace the init
            state = state.replace(params=init_from_lib.load_init_params(config.init_from,
                                                                        state.params))
    else:
        start_step, payload = restored
        state = payload["train_state"]
        train_key = jax.random.wrap_key_data(payload["rng"])
    # One placement for fresh and restored keys: otherwise they differ in type and the
    # train step compiles twice.
    # (device_put cannot target other processes' devices: build the global array from
    # each process's identical copy.)
    train_key = jax.random.wrap_key_data(jax.make_array_from_process_local_data(
        replicated, np.asarray(jax.random.key_data(train_key))))
    writer = MetricWriter(workdir, tensorboard=config.tensorboard,
                          resume_step=start_step if restored else None,
                          redo_evals=bool(restored) and start_step >= total)
    progress = Progress(start_step, total)
    if restored:
        progress.print(start_step, "resume", {"from": ckpt.directory})

    train_step, eval_step = program.train_step, program.eval_step
    per_process = config.batch_size // jax.process_count()

    def save(step: int) -> None:
        ckpt.save(step, {"train_state": state, "rng": jax.random.key_data(train_key)},
                  train_iter, signature)

    interval: list[dict[str, float]] = []
    last_train: dict[str, float] = {}
    pending: list[tuple[int, Any, str]] = []  # dispatched steps whose metrics are not read yet

    def drain() -> None:
        # Reading a step's metrics waits for it; doing it one step late keeps the device busy.
        while pending:
            step, dev_metrics, bhash = pending.pop(0)
            m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
            for k in ("nonfinite_steps", "consecutive_nonfinite"):
                m[k] = int(m[k])
            m["batch_hash"] = bhash
            interval.append(m)
            if not m["finite"]:
                progress.print(step, "nonfinite", {
                    "loss": m["loss"], "grad_norm": m["grad_norm"],
                    "skipped_in_a_row": int(m["consecutive_nonfinite"]),
                    "skipped_total": int(m["nonfinite_steps"])})
            if step_callback is not None:
                step_callback(step, m)
            if m["consecutive_nonfinite"] >= config.nonfinite.max_consecutive:
                if saved_step is None:
                    saved = f"no checkpoint has been saved in {ckpt.directory}"
                else:
                    saved = (f"the newest checkpoint is step {saved_step} in {ckpt.directory} "
                             "(skipped steps apply no update, so it holds none from a "
                             "non-finite step)")
                raise NonFiniteError(
                    f"{int(m['consecutive_nonfinite'])} consecutive non-finite steps ending at "
                    f"step {step} (nonfinite.max_consecutive={config.nonfinite.max_consecutive}); "
                    f"no update was applied for them; {saved}: lower the learning rate or fix "
                    "the data")

    def log(step: int) -> None:
        nonlocal last_train
        drain()
        if not interval:
            return
        finite = [m for m in interval if m["finite"]]
        avg = {k: float(np.mean([m[k] for m in finite])) for k in finite[0]
               if k not in _LAST_VALUE + ("finite", "batch_hash")} if finite else {}
        avg.update({k: interval[-1][k] for k in _LAST_VALUE})
        avg["skipped_steps"] = len(interval) - len(finite)
        avg["batch_hash"] = interval[-1]["batch_hash"]
        rate = progress.rate(step)
        if rate is not None:
            avg["steps_per_sec"] = rate
        writer.write(step, "train", avg)
        progress.print(step, "train", {k: v for k, v in avg.items()
                                       if k in ("loss", "accuracy", "exact_match", "grad_norm")},
                       rate)
        last_train = avg
        interval.clear()

    def run_eval(step: int, splits) -> dict[str, float]:
        out = {}
        for split in splits:
            t = time.perf_counter()
            res = evaluate(eval_step, state.params, config, spec, split, batch_sharding)
            res["eval_seconds"] = time.perf_counter() - t
            writer.write(step, split, res)
            progress.print(step, split, {k: v for k, v in res.items() if k != "eval_seconds"})
            out.update({f"{split}/{k}": v for k, v in res.items()})
        return out

    step, preempted, saved_step = start_step, False, start_step if restored else None
    try:
        with PreemptionGuard() as guard:
            while step < total:
                if _stop_requested(guard, step, config.log_every):
                    preempted = True
                    break
                np_batch = inputs.with_weights(next(train_iter), per_process)
                bhash = inputs.batch_hash(np_batch)
                state, dev_metrics = train_step(
                    state, inputs.to_global(np_batch, batch_sharding), train_key)
                drain()  # the previous step's metrics
                step += 1
                if not progress.started:  # the first step compiled: time steps from here
                    jax.block_until_ready(dev_metrics)
                    progress.start(step)
                pending.append((step, dev_metrics, bhash))
                if step % config.log_every == 0 or step == total:
                    log(step)
                if config.eval_every and step % config.eval_every == 0 and step < total:
                    drain()
                    run_eval(step, config.data.eval_splits)
                    progress.start(step)  # the rate and ETA count training steps only
                every = config.checkpoint.every_steps
                if (every and step % every == 0) or step == total:
                    drain()
                    save(step)
                    saved_step = step
            drain()
            if preempted:
                log(step)
                if saved_step != step:
                    save(step)
                progress.print(step, "preempted", {
                    "signal": guard.signal, "checkpoint": ckpt.directory,
                    "resume": "rerun the same command"})
        result: dict[str, Any] = {"step": step, "preempted": preempted,
                                  "nonfinite_steps": int(jax.device_get(state.nonfinite_steps))}
        result.update({f"train/{k}": v for k, v in last_train.items() if k != "batch_hash"})
        if not preempted:
            if saved_step != step:
                save(step)
            result.update(run_eval(step, config.data.final_eval_splits))
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()
    result["fingerprint"] = fingerprint(state.params)
    result["wall_time_s"] = time.perf_counter() - start_time
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result
