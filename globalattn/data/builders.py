"""Shared base for the locally generated TFDS tasks: configs, metadata, builder.

Every task module (listops, mqar, retrieval, span_qa) defines
  * a :class:`TaskConfig` subclass carrying the task parameters, so several
    sizes of one task coexist in one data dir (``<data_dir>/<name>/<config>/<version>``);
  * a :class:`SyntheticTaskBuilder` subclass (a ``tfds.core.GeneratorBasedBuilder``)
    with ``VERSION``, ``RELEASE_NOTES`` and ``BUILDER_CONFIGS``.

Generation is a pure function of the config (its ``seed`` included): all
splits are generated together in ``_split_generators`` so that tasks that
deduplicate can do so across splits, then handed to TFDS, which writes
``array_record`` files. Nothing here needs TensorFlow.

Examples are stored unpadded (``tokens`` may be variable length); the input
pipeline (:mod:`globalattn.data.pipeline`) pads them to the config's static
length.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
from typing import Any, Callable, ClassVar, Iterator, Sequence

import tensorflow_datasets as tfds

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TaskMetadata:
    """What a model needs to know about a task's batches.

    Attributes:
      kind: 'classification' (batch has 'label' [B]), 'token' ('labels' [B, T]
        and 'label_mask' [B, T]) or 'span' ('start' [B], 'end' [B], inclusive).
      vocab_size: token ids are in [0, vocab_size).
      num_classes: classes of 'label' / 'labels'; None for span tasks.
      max_length: T, the static padded length of a batch (before an optional CLS).
      pad_id: id of padding (always 0).
      cls_id: id a model or the pipeline may prepend as a CLS token; None if the
        vocabulary has none.
    """

    kind: str
    vocab_size: int
    num_classes: int | None
    max_length: int
    pad_id: int = 0
    cls_id: int | None = None


@dataclasses.dataclass(eq=False)
class TaskConfig(tfds.core.BuilderConfig):
    """Parameters shared by every generated task.

    Attributes:
      seed: generation seed; the data set is a deterministic function of the config.
      num_train, num_validation, num_test: split sizes (a size of 0 omits the split).
    """

    seed: int = 0
    num_train: int = 1000
    num_validation: int = 100
    num_test: int = 100

    def split_sizes(self) -> dict[str, int]:
        """Split name -> number of examples, omitting empty splits."""
        sizes = dict(zip(SPLITS, (self.num_train, self.num_validation, self.num_test)))
        return {k: v for k, v in sizes.items() if v > 0}

    def validate(self) -> None:
        """Raises ValueError naming the offending parameters."""
        if min(self.num_train, self.num_validation, self.num_test) < 0:
            raise ValueError(
                f"split sizes must be >= 0, got {self.num_train}/{self.num_validation}/{self.num_test}"
            )
        if not self.split_sizes():
            raise ValueError(f"config {self.name!r} has no non-empty split")

    def metadata(self) -> TaskMetadata:
        """Metadata of the task under this config (vocab, classes, padded length)."""
        raise NotImplementedError(f"{type(self).__name__} does not define metadata()")

    def params(self) -> dict[str, Any]:
        """The task parameters (everything but TFDS bookkeeping), JSON-serialisable."""
        skip = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


def derive_seed(seed: int, *parts: Any) -> int:
    """A 64-bit seed from a base seed and labels, stable across runs and platforms."""
    digest = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@contextlib.contextmanager
def worker_pool(num_workers: int | None) -> Iterator[Callable[[Callable, Sequence], list]]:
    """Yields an ordered ``map(fn, jobs)``, in worker processes when that pays off.

    Uses 'spawn' processes because the caller may have JAX (and its threads)
    live, which makes fork unsafe; spawn re-imports the caller's main module,
    so a script that prepares large data sets needs the usual
    ``if __name__ == "__main__":`` guard. Results come back in job order, so
    output never depends on the number of workers.
    """
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    pool = None

    def run(fn: Callable, jobs: Sequence) -> list:
        nonlocal pool
        # Spawned workers take seconds to start (imports); only worth it for many jobs.
        if workers <= 1 or len(jobs) < 4 * workers:
            return [fn(job) for job in jobs]
        if pool is None:
            pool = multiprocessing.get_context("spawn").Pool(workers)
        return pool.map(fn, jobs, chunksize=1)

    try:
        yield run
    finally:
        if pool is not None:
            pool.terminate()


class SyntheticTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: subclasses give features and the split generator.

    Subclasses set ``name``, ``VERSION``, ``RELEASE_NOTES``, ``BUILDER_CONFIGS``
    (whose first entry is the default) and implement the abstract methods.
    """

    BUILDER_CONFIGS: ClassVar[list[TaskConfig]]
    # True: records are stored in the generator's key order (TFDS ``disable_shuffling``)
    # instead of TFDS's hash order; a task whose record i must be input line i sets it.
    DISABLE_SHUFFLING: ClassVar[bool] = False

    @abc.abstractmethod
    def _task_features(self) -> dict[str, tfds.features.FeatureConnector]:
        """Feature connectors of one stored (unpadded) example."""

    def _make_split(self, split: str, size: int) -> list[dict[str, Any]]:
        """``size`` examples of one split; used by the default ``_make_splits``."""
        raise NotImplementedError

    def _make_splits(self) -> dict[str, list[dict[str, Any]]]:
        """All examples of all splits of ``self.builder_config``, deterministically.

        Override this (as ListOps does) when splits must be generated jointly.
        """
        sizes = self.builder_config.split_sizes()
        return {split: self._make_split(split, size) for split, size in sizes.items()}

    def task_metadata(self) -> TaskMetadata:
        """Metadata of this builder's config (vocab, classes, padded length)."""
        return self.builder_config.metadata()

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        metadata = tfds.core.MetadataDict(
            task=dataclasses.asdict(self.task_metadata()), params=cfg.params()
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{(self.__doc__ or '').strip()}\nConfig: {cfg.description or cfg.name}",
            features=tfds.features.FeaturesDict(self._task_features()),
            metadata=metadata,
            disable_shuffling=self.DISABLE_SHUFFLING,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # everything is generated locally
        self.builder_config.validate()
        splits = self._make_splits()
        return {split: self._generate_examples(examples) for split, examples in splits.items()}

    def _generate_examples(self, examples: list[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
        # The key only has to be unique within a split; TFDS hashes it to order records.
        yield from enumerate(examples)
