"""Registry and input pipeline: TFDS builders -> array_record -> grain batches.

Typical use (all names documented below)::

    from globalattn import data
    it = data.make_iterator("listops", "train", batch_size=32, seed=0,
                            config="short", data_dir="/tmp/tfds")
    batch = next(it)              # dict of numpy arrays, see "Batch format"
    state = it.get_state()        # bytes; save with the training checkpoint
    it.set_state(state)           # resume exactly where it was

Preparation: the first call prepares the data set into
``<data_dir>/<builder>/<config>/<version>/`` as array_record files (TFDS's
``download_and_prepare`` with ``file_format='array_record'``); later calls
reuse it. ``data_dir=None`` means TFDS's default: ``$TFDS_DATA_DIR`` or
``~/tensorflow_datasets``. In a multi-host job prepare once first (e.g.
``python -m globalattn.data prepare listops short --data_dir DIR``) so hosts do
not race to write the same directory.

Reading needs no TensorFlow: ``builder.as_data_source(split)`` (what
``tfds.data_source`` returns) is a random-access ``ArrayRecordDataSource``
whose records TFDS decodes to numpy. grain's ``DataLoader`` with an
``IndexSampler`` then shards (by process, via grain's ``ShardOptions``),
shuffles (a seeded global shuffle, re-drawn each epoch), pads and batches.
The iterator's position is ``get_state()`` / ``set_state()``.

Batch format (numpy, static shapes; B batch, T the config's ``max_length``,
plus 1 if ``prepend_cls``):
  * 'tokens' int32 [B, T], 'padding_mask' bool [B, T] (True = real token),
    'segment_ids' int32 [B, T] (0 where meaningless and on padding);
  * classification ('listops', 'long_range_retrieval'): 'label' int32 [B];
  * token tasks ('mqar', 'charlm'): 'labels' int32 [B, T], 'label_mask' bool [B, T];
  * span QA ('span_qa'): 'start' int32 [B], 'end' int32 [B] (inclusive);
  * 'jsonl' (pre-tokenised local files, :mod:`.jsonl`): classification or span QA,
    as its metadata.json says.
An example longer than T is an error naming both lengths; nothing is truncated.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from globalattn.data import builders, charlm, jsonl, listops, mqar, retrieval, span_qa

# The one registry of data sets: TFDS builder name -> builder class. A builder without
# BUILDER_CONFIGS (``jsonl``) turns a string config into its TaskConfig with
# ``config_from_string`` (for ``jsonl``: the directory of its files).
BUILDERS: dict[str, type[builders.SyntheticTaskBuilder]] = {
    cls.name: cls
    for cls in (listops.Listops, mqar.Mqar, retrieval.LongRangeRetrieval, span_qa.SpanQa,
                charlm.CharLm, jsonl.Jsonl)
}
ConfigArg = str | builders.TaskConfig | Mapping[str, Any] | None


def _builder_class(name: str) -> type[builders.SyntheticTaskBuilder]:
    if name not in BUILDERS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(BUILDERS)}")
    return BUILDERS[name]


def resolve_config(name: str, config: ConfigArg = None) -> builders.TaskConfig:
    """The TaskConfig of task ``name`` that ``config`` denotes.

    Args:
      name: a key of :data:`BUILDERS`.
      config: None (the builder's default, its first config), the name of a
        predefined config, a TaskConfig, or a mapping of parameter overrides
        applied to ``config.get('base')`` (default: the default config). An
        override mapping without 'name' gets a name derived from its values,
        so differently parameterised data sets never share a directory. For
        ``jsonl`` it is the directory of the JSONL files (see :mod:`.jsonl`).
    """
    cls = _builder_class(name)
    by_name = {c.name: c for c in cls.BUILDER_CONFIGS}
    from_string = getattr(cls, "config_from_string", None)
    if from_string is not None and (config is None or isinstance(config, str)) \
            and config not in by_name:
        cfg = from_string(config or "")
    elif config is None:
        cfg = cls.BUILDER_CONFIGS[0]
    elif isinstance(config, str):
        if config not in by_name:
            raise ValueError(f"task {name!r} has no config {config!r}; available: {sorted(by_name)}")
        cfg = by_name[config]
    elif isinstance(config, builders.TaskConfig):
        cfg = config
    elif isinstance(config, Mapping):
        overrides = dict(config)
        base = resolve_config(name, overrides.pop("base", None))
        allowed = set(base.params()) | {"name", "description"}
        unknown = set(overrides) - allowed
        if unknown:
            raise ValueError(f"unknown {name!r} parameters {sorted(unknown)}; valid: {sorted(allowed)}")
        if not overrides:
            return base
        overrides.setdefault("description", f"{base.name} with {overrides}")
        if "name" not in overrides:
            params = {k: v for k, v in overrides.items() if k != "description"}
            digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
            overrides["name"] = f"{base.name}_{digest[:10]}"
        cfg = dataclasses.replace(base, **overrides)
    else:
        raise TypeError(f"config must be None, str, TaskConfig or mapping, got {type(config)}")
    cfg.validate()
    return cfg


def task_metadata(name: str, config: ConfigArg = None) -> builders.TaskMetadata:
    """Vocab size, number of classes, padded length, pad / CLS ids of a task config."""
    return resolve_config(name, config).metadata()


def get_builder(name: str, config: ConfigArg = None, data_dir: str | None = None
                ) -> builders.SyntheticTaskBuilder:
    """The TFDS builder of a task config, writing array_record under ``data_dir``.

    Raises ValueError if ``data_dir`` already holds this builder/config/version
    generated from different parameters (e.g. an edited config under an old name).
    """
    cfg = resolve_config(name, config)
    builder = _builder_class(name)(config=cfg, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        stored = dict(builder.info.metadata or {}).get("params")
        if stored is not None and stored != json.loads(json.dumps(cfg.params())):
            raise ValueError(
                f"{builder.data_dir} was generated with {stored}, which differs from the "
                f"requested {cfg.params()}; give the new config another name"
            )
    return builder


def prepare(name: str, config: ConfigArg = None, data_dir: str | None = None
            ) -> builders.SyntheticTaskBuilder:
    """Generates and writes a task's splits once (a no-op if already prepared)."""
    builder = get_builder(name, config, data_dir)
    builder.download_and_prepare()
    return builder


def data_source(name: str, split: str, config: ConfigArg = None, data_dir: str | None = None,
                prepare_if_missing: bool = True) -> Sequence[dict[str, np.ndarray]]:
    """Random-access, TF-free source of one split's decoded (unpadded) examples."""
    builder = get_builder(name, config, data_dir)
    if not builder.is_prepared():
        if not prepare_if_missing:
            raise FileNotFoundError(f"{builder.data_dir} is not prepared; call prepare() first")
        builder.download_and_prepare()
    return builder.as_data_source(split=split)


@dataclasses.dataclass(frozen=True)
class FormatExample(grain.transforms.Map):
    """Pads one stored example to the batch contract (see module docstring).

    Attributes:
      kind: 'classification', 'token' or 'span' (TaskMetadata.kind).
      length: T, the padded length (after the optional CLS).
      cls_id: if not None, this id is prepended (labels / spans shift by one).
    """

    kind: str
    length: int
    cls_id: int | None = None

    def map(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        tokens = np.asarray(example["tokens"], np.int32)
        shift = 0 if self.cls_id is None else 1
        n = tokens.shape[0] + shift
        if n > self.length:
            raise ValueError(
                f"example has {n} tokens{' (with CLS)' if shift else ''} but the padded length "
                f"is {self.length}; nothing is truncated: raise the length or fix the data"
            )

        def pad(values: np.ndarray, dtype: Any, first: Any = 0) -> np.ndarray:
            out = np.zeros(self.length, dtype)
            if shift:
                out[0] = first
            out[shift:n] = values
            return out

        out = {
            "tokens": pad(tokens, np.int32, self.cls_id),
            "padding_mask": np.arange(self.length) < n,
            "segment_ids": pad(example.get("segment_ids", 0), np.int32),
        }
        if self.kind == "classification":
            out["label"] = np.int32(example["label"])
        elif self.kind == "token":
            out["labels"] = pad(example["labels"], np.int32)
            out["label_mask"] = pad(example["label_mask"], bool, False)
        elif self.kind == "span":
            out["start"] = np.int32(example["start"] + shift)
            out["end"] = np.int32(example["end"] + shift)
        else:
            raise ValueError(f"unknown task kind {self.kind!r}")
        return out


def loader_from_source(
    source: Sequence[Mapping[str, Any]],
    operations: Sequence[grain.transforms.Map],
    batch_size: int,
    seed: int,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
) -> grain.DataLoader:
    """A grain DataLoader over any random-access source (shared by all loaders).

    ``shard_options`` defaults to ``ShardByJaxProcess(drop_remainder=True)``:
    each JAX process reads only its equal-sized shard, and ``batch_size`` is
    the per-process batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32) for grain's sampler, got {seed}")
    if shard_options is None:
        shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=shuffle,
        num_epochs=num_epochs, seed=seed,
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[*operations, grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count,
    )


def make_loader(
    name: str,
    split: str,
    batch_size: int,
    seed: int = 0,
    *,
    config: ConfigArg = None,
    data_dir: str | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    drop_remainder: bool = True,
    pad_to: int | None = None,
    prepend_cls: bool = False,
    worker_count: int = 0,
    prepare_if_missing: bool = True,
) -> grain.DataLoader:
    """A grain DataLoader of padded batches of a task split (see module docstring).

    Args:
      name, config, data_dir: which data set (see :func:`resolve_config`).
      split: 'train', 'validation' or 'test'.
      batch_size: examples per batch in this process.
      seed: shuffle seed (same seed, same order, on every run).
      shuffle: global shuffle, re-drawn every epoch; False for evaluation order.
      num_epochs: None repeats forever (training); 1 for one evaluation pass.
      shard_options: grain sharding; default one shard per JAX process.
      drop_remainder: drop a final partial batch (keeps shapes static).
      pad_to: padded length; default the config's ``max_length`` (+1 with CLS).
      prepend_cls: put the task's CLS id at position 0 (labels shift accordingly).
      worker_count: grain worker processes (0 reads in this process).
      prepare_if_missing: generate the data set if it is not in ``data_dir`` yet.
    """
    meta = task_metadata(name, config)
    if prepend_cls and meta.cls_id is None:
        raise ValueError(f"task {name!r} has no CLS token to prepend")
    length = pad_to or meta.max_length + int(prepend_cls)
    source = data_source(name, split, config, data_dir, prepare_if_missing)
    fmt = FormatExample(meta.kind, length, meta.cls_id if prepend_cls else None)
    return loader_from_source(
        source, [fmt], batch_size, seed, shuffle=shuffle, num_epochs=num_epochs,
        shard_options=shard_options, drop_remainder=drop_remainder, worker_count=worker_count,
    )


def make_iterator(name: str, split: str, batch_size: int, seed: int = 0, **kwargs: Any
                  ) -> grain.DataLoaderIterator:
    """``iter(make_loader(...))``: yields batches; ``get_state()`` / ``set_state()`` checkpoint it."""
    return iter(make_loader(name, split, batch_size, seed, **kwargs))
