"""The experiment config schema, loading, overrides, sweeps and cross-field validation.

Every file in ``configs/`` starts from :func:`base_config`, sets what differs,
and locks it, so a misspelt override (``--config.optim.lerning_rate``) fails
with a "did you mean" instead of training with the default. Fields left as
``None`` placeholders (``model.vocab_size``, ``model.num_classes``,
``model.max_len``, ``eval_batch_size``) are filled from the task's metadata by
:func:`validate_config`, so changing ``data.config`` alone (e.g. ``t64`` ->
``t128``) gives a consistent model.

:func:`validate_config` is the one place where fields are checked against each
other (window vs sequence length, globals vs capacity, batch vs devices, ...);
every error names the values involved, and all errors are reported at once.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import math
import numbers
import os
import types
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
from ml_collections import config_dict

from globalattn import data as data_lib
from globalattn import sharding as sharding_lib
from globalattn.modules import ModelConfig, build_model, default_model_config
from globalattn.train import init_from as init_from_lib
from globalattn.modules.strategies import check_block_size

__all__ = [
    "RunSpec",
    "apply_overrides",
    "base_config",
    "check_arg",
    "load_config",
    "load_config_module",
    "shrink_for_tests",
    "use_jsonl_data",
    "sweep_configs",
    "validate_config",
]

# Task kind (TaskMetadata.kind) -> the model head that fits it.
HEAD_FOR_KIND = {"classification": "classify", "token": "token", "span": "span"}


def base_config() -> ml_collections.ConfigDict:
    """All experiment fields with defaults; unlocked (experiment files lock it)."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # init, dropout / random-block keys and the data shuffle order

    c.data = ml_collections.ConfigDict()
    c.data.name = "long_range_retrieval"  # a key of globalattn.data.BUILDERS
    c.data.config = "t64"  # a builder config name of that task
    c.data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.data.prepend_cls = False  # put the task's CLS id at position 0 (ListOps needs it)
    # Train-set shuffle order; None = seed. Fixing it while varying seed changes only the
    # initialisation and dropout (what ablations over seeds compare on the same batches).
    c.data.shuffle_seed = config_dict.placeholder(int)
    c.data.eval_splits = ("validation",)  # evaluated every eval_every steps
    c.data.final_eval_splits = ("validation", "test")  # evaluated once at the end

    model = default_model_config()
    model.unlock()
    # None = from the task (see validate_config); an explicit value is checked instead.
    model.vocab_size = config_dict.placeholder(int)
    model.num_classes = config_dict.placeholder(int)
    model.max_len = config_dict.placeholder(int)
    c.model = model
    c.num_active_globals = config_dict.placeholder(int)  # None = all G slots active
    # A converted pretrained checkpoint (python -m globalattn.convert) to fine-tune: the
    # model is then its encoder with the task's head (see globalattn.train.init_from).
    c.init_from = config_dict.placeholder(str)

    c.batch_size = 32  # global (all processes, all devices)
    c.eval_batch_size = config_dict.placeholder(int)  # None = batch_size
    c.num_train_steps = 400

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3  # peak, reached after warmup
    c.optim.warmup_steps = 40  # linear from 0
    c.optim.end_learning_rate_factor = 0.0  # cosine decay ends at peak * this
    c.optim.weight_decay = 0.01  # decoupled (AdamW), matrices only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 disables it

    c.nonfinite = ml_collections.ConfigDict()
    c.nonfinite.max_consecutive = 10  # stop with an error after this many skipped steps in a row
    # Fault injection (tests, drills): 0-based step indices (state.step before the update)
    # whose loss is multiplied by NaN.
    c.nonfinite.inject_at_steps = ()

    c.log_every = 20
    c.eval_every = 0  # 0 = evaluate at the end only
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200  # 0 = only at the end and on SIGTERM
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True

    # The device mesh, outermost axis first (globalattn.sharding.MESH_AXES). At most one
    # axis is -1 (the devices left over); a mesh smaller than the machine uses the first
    # devices. The batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data parallelism (parameters replicated)
    c.mesh.fsdp = 1  # data parallelism with parameters / optimizer state split along 'embed'
    c.mesh.model = 1  # tensor parallelism (heads, mlp)
    # Logical axis -> mesh axes, e.g. (("embed", "fsdp"), ("heads", "model"), ...); None =
    # globalattn.sharding.DEFAULT_LOGICAL_AXIS_RULES. Mesh axes a mesh lacks are dropped.
    c.logical_axis_rules = config_dict.placeholder(tuple)
    # Multi-host: passed to globalattn.train.distributed.initialize by experiments/train.py.
    # None = from the environment (GLOBALATTN_* / JAX_* variables, or SLURM / Open MPI /
    # TPU-pod auto-detection); on one machine nothing is initialized.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = config_dict.placeholder(str)  # host:port of process 0
    c.distributed.num_processes = config_dict.placeholder(int)
    c.distributed.process_id = config_dict.placeholder(int)
    c.distributed.local_device_ids = config_dict.placeholder(tuple)  # e.g. (0, 1)
    c.tensorboard = True
    return c


# ---------------------------------------------------------------------------------------
# Loading and overriding.


def load_config_module(path: str) -> types.ModuleType:
    """Imports a config file by path (``configs/long_range.py``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "_globalattn_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"config file {path!r} has no get_config(arg=None)")
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``'configs/x.py[:arg]'`` -> ``get_config(arg)``, as ``--config=`` reads it."""
    path, _, arg = spec.partition(":")
    return load_config_module(path).get_config(arg or None)


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f'; did you mean "{close[0]}"?' if close else f"; valid: {sorted(options)}"


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
    """A copy of ``config`` with dotted-path overrides (``{'model.window': 8}``).

    Same semantics as ``--config.a.b=v`` on the command line: the path must
    exist and the value must have the field's type (ints widen to floats).

    Raises:
      KeyError: an unknown path, with the closest valid name.
      TypeError: a value of the wrong type, naming the path.
    """
    out = copy.deepcopy(config)
    for path, value in overrides.items():
        node, parts = out, path.split(".")
        for i, part in enumerate(parts):
            keys = list(node.keys())
            if part not in keys:
                where = ".".join(parts[:i]) or "config"
                raise KeyError(f"{where} has no field {part!r} (override {path!r})"
                               f"{_suggest(part, keys)}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            setattr(node, parts[-1], value)
        except TypeError as err:
            raise TypeError(f"override {path}={value!r}: {err}") from None
    return out


def sweep_configs(config: ml_collections.ConfigDict, sweep: Sequence[Mapping[str, Any]]
                  ) -> list[tuple[str, ml_collections.ConfigDict]]:
    """``(name, config)`` for each entry of a config file's ``sweep()``.

    Each entry maps dotted paths to values; the reserved key ``'name'`` names
    the run (default: the overrides joined), and must be unique.
    """
    runs, seen = [], set()
    for entry in sweep:
        entry = dict(entry)
        name = entry.pop("name", None) or ",".join(f"{k}={v}" for k, v in entry.items())
        if name in seen:
            raise ValueError(f"sweep run name {name!r} appears twice")
        seen.add(name)
        runs.append((name, apply_overrides(config, entry)))
    return runs


def call_sweep(module: types.ModuleType, arg: str | None) -> list[dict[str, Any]]:
    """A config module's ``sweep(arg)`` (or ``sweep()``); [] if it defines none."""
    fn: Callable | None = getattr(module, "sweep", None)
    if fn is None:
        return []
    return list(fn(arg) if inspect.signature(fn).parameters else fn())


# ---------------------------------------------------------------------------------------
# Validation.


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything validate_config derived from a config.

    Attributes:
      meta: the task's metadata (kind, vocab, classes, stored length).
      seq_len: T of every batch (max_length, +1 with prepend_cls).
      model_config: the frozen, validated model config (placeholders filled).
      model: the model ``build_model(model_config)``, built once here; the loop
        and the ablation use it.
      capacity: static global capacity G of the model (latents for Perceiver).
      mesh_shape: every axis of ``config.mesh`` (e.g. data / fsdp / model), -1 resolved.
      rules: the logical-axis rules (``config.logical_axis_rules`` or the defaults).
      eval_batch_size: global eval batch size (placeholder resolved).
      split_sizes: examples per split of the data config.
    """

    meta: data_lib.TaskMetadata
    seq_len: int
    model_config: ModelConfig
    model: Any
    capacity: int
    mesh_shape: dict[str, int]
    rules: Any
    eval_batch_size: int
    split_sizes: dict[str, int]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _positive(errors: list[str], name: str, v: Any, lo: int = 1) -> None:
    if not _is_int(v) or v < lo:
        errors.append(f"{name} must be an int >= {lo}, got {v!r}")


def _model_config(config: ml_collections.ConfigDict, meta: data_lib.TaskMetadata, seq_len: int,
                  errors: list[str]) -> dict:
    """The model config (a dict) with task-derived placeholders filled; checks explicit
    values against the task."""
    m = config.model
    derived = {"vocab_size": meta.vocab_size, "max_len": seq_len,
               "num_classes": meta.num_classes or default_model_config().num_classes}
    if m.vocab_size is not None and m.vocab_size < meta.vocab_size:
        errors.append(f"model.vocab_size={m.vocab_size} < the vocabulary of "
                      f"{config.data.name}/{config.data.config} ({meta.vocab_size}); leave it None")
    if m.max_len is not None and m.max_len < seq_len:
        errors.append(f"model.max_len={m.max_len} < sequence length T={seq_len} of "
                      f"{config.data.name}/{config.data.config}; leave it None")
    if (m.num_classes is not None and meta.num_classes is not None
            and m.num_classes != meta.num_classes):
        errors.append(f"model.num_classes={m.num_classes} but {config.data.name} has "
                      f"{meta.num_classes} classes; leave it None")
    want = HEAD_FOR_KIND[meta.kind]
    if m.arch == "lm":  # a causal LM predicts every next token: a token task
        want = "lm" if meta.kind == "token" else want
    if m.head != want:
        errors.append(f"model.head={m.head!r} does not fit task {config.data.name!r} of kind "
                      f"{meta.kind!r}; set --config.model.head={want}")
    out = m.to_dict()
    for key, value in derived.items():
        if out[key] is None:
            out[key] = value
    return out


def validate_config(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                    process_count: int | None = None) -> RunSpec:
    """Checks a config as a whole and resolves its derived values.

    Args:
      config: an experiment config (see :func:`base_config`).
      device_count, process_count: default ``jax.device_count()`` /
        ``jax.process_count()`` (override to validate for another machine).

    Raises:
      ValueError: listing every problem found, each naming the values.
    """
    device_count = jax.device_count() if device_count is None else device_count
    process_count = jax.process_count() if process_count is None else process_count
    errors: list[str] = []

    # Scalars first: later checks use them.
    for name in ("seed", "data.shuffle_seed"):
        value = config.seed if name == "seed" else config.data.shuffle_seed
        if name == "seed" or value is not None:
            if not _is_int(value) or not 0 <= value < 2**32:
                errors.append(f"{name} must be an int in [0, 2**32), got {value!r}")
    _positive(errors, "num_train_steps", config.num_train_steps)
    _positive(errors, "log_every", config.log_every)
    _positive(errors, "eval_every", config.eval_every, 0)
    _positive(errors, "checkpoint.every_steps", config.checkpoint.every_steps, 0)
    _positive(errors, "checkpoint.max_to_keep", config.checkpoint.max_to_keep)
    _positive(errors, "nonfinite.max_consecutive", config.nonfinite.max_consecutive)
    o = config.optim
    if not o.learning_rate > 0:
        errors.append(f"optim.learning_rate must be > 0, got {o.learning_rate}")
    _positive(errors, "optim.warmup_steps", o.warmup_steps, 0)
    if _is_int(o.warmup_steps) and _is_int(config.num_train_steps) \
            and o.warmup_steps > config.num_train_steps:
        errors.append(f"optim.warmup_steps={o.warmup_steps} > num_train_steps="
                      f"{config.num_train_steps}: the peak learning rate is never reached")
    if not 0.0 <= o.end_learning_rate_factor <= 1.0:
        errors.append(f"optim.end_learning_rate_factor must be in [0, 1], got "
                      f"{o.end_learning_rate_factor}")
    # clip_by_global_norm(0) turns every update into NaN (optax), so 0 means "off".
    if o.grad_clip_norm < 0:
        errors.append(f"optim.grad_clip_norm must be >= 0 (0 disables clipping), got "
                      f"{o.grad_clip_norm}")
    if o.weight_decay < 0:
        errors.append(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    if not all(_is_int(s) and s >= 0 for s in config.nonfinite.inject_at_steps):
        errors.append(f"nonfinite.inject_at_steps must be step numbers >= 0, got "
                      f"{config.nonfinite.inject_at_steps}")

    # Devices: mesh, logical-axis rules and batch sizes.
    mesh_shape: dict[str, int] = {}
    unknown_axes = sorted(set(config.mesh.keys()) - set(sharding_lib.MESH_AXES))
    if unknown_axes:
        errors.append(f"mesh axes {unknown_axes} are not known; use {list(sharding_lib.MESH_AXES)}")
    else:
        try:
            mesh_shape = sharding_lib.resolve_mesh_shape(config.mesh.to_dict(), device_count)
        except ValueError as err:
            errors.append(str(err))
    if mesh_shape.get("seq", 1) > 1:
        errors.append(f"mesh.seq={mesh_shape['seq']}: the training models do not split the "
                      "sequence over devices (sequence_parallel_global_local_attention is a "
                      "library function); set mesh.seq=1")
    try:
        rules = sharding_lib.rules_from_config(config.logical_axis_rules)
    except ValueError as err:
        errors.append(f"logical_axis_rules: {err}")
        rules = sharding_lib.DEFAULT_LOGICAL_AXIS_RULES
    dp = math.prod(mesh_shape.get(a, 1) for a in sharding_lib.BATCH_MESH_AXES)
    eval_bs = config.batch_size if config.eval_batch_size is None else config.eval_batch_size
    for name, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs)):
        _positive(errors, name, bs)
        if _is_int(bs) and mesh_shape and bs % dp:
            errors.append(f"{name}={bs} is not divisible by the {dp} data-parallel devices "
                          f"(mesh {mesh_shape}: the batch is split over "
                          f"{' x '.join(sharding_lib.BATCH_MESH_AXES)}); use a multiple of {dp}")
        if _is_int(bs) and bs % process_count:
            errors.append(f"{name}={bs} is not divisible by the {process_count} processes")
    dist = config.distributed
    if dist.num_processes is not None and dist.num_processes != process_count \
            and process_count > 1:
        errors.append(f"distributed.num_processes={dist.num_processes} but JAX runs "
                      f"{process_count} processes")

    # Data: the task config, its splits and its length.
    try:
        task_cfg = data_lib.resolve_config(config.data.name, config.data.config)
    except ValueError as err:
        errors.append(f"data: {err}")
        raise ValueError(_format(errors)) from None
    meta = task_cfg.metadata()
    split_sizes = task_cfg.split_sizes()
    for field in ("eval_splits", "final_eval_splits"):
        missing = [s for s in config.data[field] if s not in split_sizes]
        if missing:
            errors.append(f"data.{field} {missing} not in the splits of {config.data.name}/"
                          f"{config.data.config}: {sorted(split_sizes)}")
    if "train" not in split_sizes:
        errors.append(f"{config.data.name}/{config.data.config} has no train split")
    if config.data.prepend_cls and meta.cls_id is None:
        errors.append(f"data.prepend_cls=True but task {config.data.name!r} has no CLS token")
    seq_len = meta.max_length + int(bool(config.data.prepend_cls))

    # Model: derived fields, then the model's own checks, then model vs data.
    model_dict = _model_config(config, meta, seq_len, errors)
    model_cfg, model, capacity = None, None, 0
    try:
        model_cfg = ModelConfig.from_config(model_dict)  # every model-field check, once
        capacity = model_cfg.capacity
    except ValueError as err:
        errors.append(f"model: {err}")
    if mesh_shape:
        errors += _model_vs_mesh(model_dict, mesh_shape, rules)
    if model_cfg is not None:
        errors += _model_vs_data(config, model_cfg, task_cfg, seq_len, capacity)
    if errors:
        raise ValueError(_format(errors))
    # A fine-tuning run wraps the pretrained encoder of config.init_from instead.
    model = init_from_lib.maybe_build(config.get("init_from"), model_cfg, build_model)
    return RunSpec(meta=meta, seq_len=seq_len, model_config=model_cfg, model=model,
                   capacity=capacity, mesh_shape=mesh_shape, rules=rules,
                   eval_batch_size=eval_bs, split_sizes=split_sizes)


# Logical axes of the parameters -> the model config field that sizes them.
_PARAM_AXIS_SIZE = {sharding_lib.EMBED: "d_model", sharding_lib.HEADS: "num_heads",
                    sharding_lib.MLP: "mlp_dim"}


def _model_vs_mesh(m: Mapping[str, Any], mesh_shape: dict[str, int],
                   rules: Any) -> list[str]:
    """Parameter dimensions that the rules split over mesh axes they do not divide."""
    errors = []
    for logical, axes in rules:
        if logical not in _PARAM_AXIS_SIZE or axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        used = [a for a in axes if mesh_shape.get(a, 1) > 1]
        n = math.prod(mesh_shape[a] for a in used)
        field = _PARAM_AXIS_SIZE[logical]
        if n > 1 and _is_int(m[field]) and m[field] % n:
            errors.append(f"model.{field}={m[field]} is not divisible by "
                          f"{' x '.join(f'mesh.{a}={mesh_shape[a]}' for a in used)} = {n} "
                          f"(logical axis {logical!r} is split over {used})")
    return errors


def _model_vs_data(config: ml_collections.ConfigDict, m: ModelConfig,
                   task_cfg: data_lib.TaskConfig, seq_len: int, capacity: int) -> list[str]:
    errors = []
    s = m.strategy
    encoder = m.arch == "encoder"
    # A window that already spans the sequence makes every global token redundant, so a
    # "global vs window" comparison would silently compare two dense models.
    if encoder and s.name != "bigbird" and m.attention_schedule != "full" and m.window >= seq_len - 1:
        errors.append(f"model.window={m.window} >= T-1={seq_len - 1}: every token already sees the "
                      f"whole sequence; use model.attention_schedule='full' for a dense baseline")
    if encoder and s.name == "bigbird":
        try:
            check_block_size(s.block_size, seq_len)
        except ValueError as err:
            errors.append(f"model.strategy: {err}")
    if encoder and s.name in ("first", "periodic") and s.num_globals > seq_len:
        errors.append(f"model.strategy.num_globals={s.num_globals} > sequence length T={seq_len}")
    if encoder and s.name == "task":
        # Span tasks whose segment 0 is the question say how long it can be (span_qa: CLS,
        # the key, SEP; jsonl: metadata.json's max_question_length).
        question = getattr(task_cfg, "max_question_length", None)
        if question is None:
            errors.append(f"strategy 'task' needs question segments; task {config.data.name!r} "
                          "has none")
        elif s.num_globals < question:
            errors.append(f"model.strategy.num_globals={s.num_globals} < question length "
                          f"{question} of {config.data.name}/{config.data.config}")
    n = config.num_active_globals
    if n is not None and not 0 <= n <= capacity:
        errors.append(f"num_active_globals={n} outside [0, capacity G={capacity}] of strategy "
                      f"{s.name!r}")
    return errors


def _format(errors: list[str]) -> str:
    return "invalid config:\n  - " + "\n  - ".join(errors)


def use_jsonl_data(config: ml_collections.ConfigDict) -> None:
    """In place: train on a local pre-tokenised JSONL directory (each fine-tuning file's ':jsonl').

    ``data.config`` is left empty, an error naming what is needed until
    ``--config.data.config=DIR`` is given. ``test.jsonl`` is optional, so the final
    evaluation is on validation; add ``--config.data.final_eval_splits='("validation",
    "test")'`` to evaluate a test file too.
    """
    config.data.name = "jsonl"
    config.data.config = ""
    config.data.final_eval_splits = ("validation",)


def shrink_for_tests(config: ml_collections.ConfigDict, data_config: str = "tiny") -> None:
    """In place: the tiny data config, a tiny model and a few steps (each file's ':test')."""
    config.data.config = data_config
    config.data.final_eval_splits = ("validation",)
    config.model.d_model = 16
    config.model.num_heads = 2
    config.model.mlp_dim = 32
    config.model.num_layers = 1  # compile time dominates tests; the loop is layer-agnostic
    config.batch_size = 8
    config.num_train_steps = 3
    config.optim.warmup_steps = 1
    config.log_every = 1
    config.eval_every = 0
    config.checkpoint.every_steps = 0
    config.checkpoint.max_to_keep = 2
    config.mesh.data = 1  # one device: small compiles (tests set -1 where they test data parallelism)


def check_arg(arg: str | None, known: Sequence[str]) -> str:
    """``arg`` or '' if None; ValueError naming the known args otherwise."""
    arg = arg or ""
    if arg not in ("", *known):
        raise ValueError(f"unknown config arg {arg!r}; use one of {['', *known]}")
    return arg
