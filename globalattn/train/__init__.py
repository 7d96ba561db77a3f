"""Training shared by every experiment: configs, state, steps, checkpoints, metrics, loop.

* :func:`train_and_evaluate` (:mod:`.loop`) -- one run in a workdir, resumable;
  returns the final metrics dict.
* :func:`evaluate` (:mod:`.evaluation`) -- metrics over a whole split, for one
  model or K vmapped variants (the loop and the ablation both call it).
* :mod:`.ablation` -- K variants (global count, seed, learning rate) trained in
  one vmapped program, each equal to its separate run.
* :func:`base_config`, :func:`validate_config`, :func:`load_config`,
  :func:`apply_overrides`, :func:`sweep_configs` (:mod:`.config`) -- the config
  schema and its cross-field checks.
* :func:`make_train_step`, :func:`make_eval_step` (:mod:`.step`) -- the pure
  jitted steps (:func:`make_step_fn`, :func:`make_eval_fn`: the same, unjitted); :class:`TrainState` (:mod:`.state`).
* :class:`Checkpointer`, :class:`PreemptionGuard` (:mod:`.checkpoint`);
  :class:`MetricWriter` (:mod:`.metrics`); per-task losses in :mod:`.tasks`.
"""
from globalattn.train.checkpoint import Checkpointer, CorruptCheckpointError, PreemptionGuard
from globalattn.train.config import (
    RunSpec,
    apply_overrides,
    base_config,
    load_config,
    load_config_module,
    sweep_configs,
    validate_config,
)
from globalattn.train.evaluation import evaluate
from globalattn.train.loop import NonFiniteError, train_and_evaluate
from globalattn.train.metrics import MetricWriter, read_jsonl
from globalattn.train.optim import learning_rate_schedule, make_optimizer
from globalattn.train.state import TrainState, fingerprint, init_train_state, state_shardings
from globalattn.train.step import make_eval_fn, make_eval_step, make_step_fn, make_train_step
from globalattn.train import ablation  # noqa: E402  (after the modules it uses)

__all__ = [
    "Checkpointer",
    "CorruptCheckpointError",
    "MetricWriter",
    "NonFiniteError",
    "PreemptionGuard",
    "RunSpec",
    "TrainState",
    "ablation",
    "apply_overrides",
    "base_config",
    "evaluate",
    "fingerprint",
    "init_train_state",
    "learning_rate_schedule",
    "load_config",
    "load_config_module",
    "make_eval_fn",
    "make_eval_step",
    "make_optimizer",
    "make_step_fn",
    "make_train_step",
    "read_jsonl",
    "state_shardings",
    "sweep_configs",
    "train_and_evaluate",
    "validate_config",
]
