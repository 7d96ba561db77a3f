"""Input glue between the grain pipelines of :mod:`globalattn.data` and the train steps.

* Training: an endless shuffled iterator of full per-process batches whose
  position is checkpointed (grain ``get_state`` / ``set_state``).
* Evaluation: one full pass over a split, never dropping an example: the last
  partial batch is filled up with copies of real rows whose weight is 0, and
  every process yields the same number of batches (processes whose shard is
  shorter yield weight-0 batches), so the jitted step sees one shape and no
  collective waits forever.

Every batch gets 'weights' float32 [B] (1 = real example, 0 = filler).
"""
from __future__ import annotations

import math
import zlib
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from globalattn import data as data_lib
from globalattn.train.config import RunSpec

__all__ = ["batch_hash", "eval_batches", "make_train_iterator", "to_global", "with_weights"]

NumpyBatch = dict[str, np.ndarray]


def _loader_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(config=config.data.config, data_dir=config.data.data_dir,
                prepend_cls=bool(config.data.prepend_cls))


def make_train_iterator(config: ml_collections.ConfigDict) -> grain.DataLoaderIterator:
    """Endless shuffled train batches of ``batch_size / process_count`` examples, in the
    order of ``data.shuffle_seed`` (None: ``seed``)."""
    per_process = config.batch_size // jax.process_count()
    seed = config.seed if config.data.shuffle_seed is None else config.data.shuffle_seed
    return data_lib.make_iterator(config.data.name, "train", per_process, seed=seed,
                                  shuffle=True, num_epochs=None, **_loader_kwargs(config))


def with_weights(batch: NumpyBatch, batch_size: int) -> NumpyBatch:
    """Pads a (possibly partial) batch to ``batch_size`` rows and adds 'weights'.

    Filler rows copy the first row (real data, so no all-padding edge case is
    exercised by accident) and get weight 0.
    """
    n = len(batch["tokens"])
    if not 0 < n <= batch_size:
        raise ValueError(f"batch has {n} rows; expected 1..{batch_size}")
    out = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) if n < batch_size
           else v for k, v in batch.items()}
    out["weights"] = (np.arange(batch_size) < n).astype(np.float32)
    return out


def empty_batch(kind: str, batch_size: int, seq_len: int) -> NumpyBatch:
    """A weight-0 batch of a task kind's shapes and dtypes: what a process whose eval
    shard has run out feeds, and the template of a batch for ahead-of-time compiling."""
    b = {"tokens": np.zeros((batch_size, seq_len), np.int32),
         "padding_mask": np.ones((batch_size, seq_len), bool),
         "segment_ids": np.zeros((batch_size, seq_len), np.int32),
         "weights": np.zeros((batch_size,), np.float32)}
    if kind == "classification":
        b["label"] = np.zeros((batch_size,), np.int32)
    elif kind == "token":
        b["labels"] = np.zeros((batch_size, seq_len), np.int32)
        b["label_mask"] = np.zeros((batch_size, seq_len), bool)
    else:
        b["start"] = np.zeros((batch_size,), np.int32)
        b["end"] = np.zeros((batch_size,), np.int32)
    return b


def num_eval_batches(num_examples: int, batch_size: int, process_count: int) -> int:
    """Batches per process that cover the largest process shard of a split."""
    return math.ceil(math.ceil(num_examples / process_count) / (batch_size // process_count))


def eval_batches(config: ml_collections.ConfigDict, spec: RunSpec, split: str
                 ) -> Iterator[NumpyBatch]:
    """Every example of ``split`` exactly once, in fixed order, in padded weighted batches."""
    processes = jax.process_count()
    local_bs = spec.eval_batch_size // processes
    loader = data_lib.make_loader(
        config.data.name, split, local_bs, seed=config.seed, shuffle=False, num_epochs=1,
        drop_remainder=False, shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=False),
        **_loader_kwargs(config))
    total = num_eval_batches(spec.split_sizes[split], spec.eval_batch_size, processes)
    count = 0
    for batch in loader:
        yield with_weights(batch, local_bs)
        count += 1
    if count > total:
        raise RuntimeError(f"split {split!r} gave {count} batches, more than the {total} "
                           f"expected from its {spec.split_sizes[split]} examples")
    for _ in range(total - count):
        yield empty_batch(spec.meta.kind, local_bs, spec.seq_len)


def to_global(batch: NumpyBatch, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays split over the 'data' axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def batch_hash(batch: NumpyBatch) -> str:
    """CRC32 of the tokens and labels: compares data order across runs cheaply."""
    crc = 0
    for key in sorted(batch):
        crc = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), crc)
    return f"{crc:08x}"
