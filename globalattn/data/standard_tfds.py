"""Catalogue TFDS data sets by name (e.g. byte-level ``imdb_reviews``), when online.

:func:`standard_source` prepares a catalogue data set as array_record (the
first time only; this downloads, so it needs network) and returns its TF-free
random-access source; :func:`make_text_loader` turns a text-classification
data set into byte-level batches in the same format as the generated tasks
(LRA's "Text" task is byte-level ``imdb_reviews`` at length 1000 or 4000)::

    loader = make_text_loader("imdb_reviews", "train", batch_size=32, seed=0,
                              max_length=1000, truncate=True)

This project's machines have no network, so the download path is untested
here: offline it fails with a RuntimeError that says so (after TFDS's own
retries, which can take a few minutes). Prepare the data set on a machine with
network (``python -m globalattn.data prepare-tfds imdb_reviews --data_dir DIR``)
and copy ``DIR/<name>`` over. Not every catalogue builder generates without
TensorFlow; ``imdb_reviews`` has no TensorFlow calls. The byte tokeniser and
batching are tested offline on an in-memory source with the same records.

Byte vocabulary: 0 pad, 1 CLS, byte b -> b + 2 (size 258).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import pipeline

BYTE_PAD_ID = 0
BYTE_CLS_ID = 1
BYTE_OFFSET = 2
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET


@dataclasses.dataclass(frozen=True)
class ByteTokenize(grain.transforms.Map):
    """A text record -> {'tokens': int32 [n] UTF-8 byte ids, 'label': int}.

    Attributes:
      max_length: longest allowed token count (reserve 1 if a CLS is prepended).
      truncate: cut longer texts to ``max_length`` bytes (LRA does); if False a
        longer text is an error naming both lengths.
      text_key, label_key: record fields.
    """

    max_length: int
    truncate: bool = False
    text_key: str = "text"
    label_key: str = "label"

    def map(self, record: Mapping[str, Any]) -> dict[str, Any]:
        text = record[self.text_key]
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if len(data) > self.max_length:
            if not self.truncate:
                raise ValueError(f"text has {len(data)} bytes > max_length {self.max_length}; "
                                 "pass truncate=True to cut it explicitly")
            data = data[: self.max_length]
        tokens = np.frombuffer(data, np.uint8).astype(np.int32) + BYTE_OFFSET
        return {"tokens": tokens, "label": int(record[self.label_key])}


def standard_source(name: str, split: str, data_dir: str | None = None, download: bool = True,
                    builder_kwargs: Mapping[str, Any] | None = None) -> Sequence[dict]:
    """TF-free source of a catalogue TFDS data set, preparing it as array_record if needed.

    Raises:
      RuntimeError: preparation failed (typically: no network); chained to the cause.
    """
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record",
                           **dict(builder_kwargs or {}))
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(f"TFDS data set {name!r} is not prepared in {builder.data_dir}")
        try:
            builder.download_and_prepare()
        except Exception as err:  # network errors come in many types; re-raise all, chained
            raise RuntimeError(
                f"could not prepare TFDS data set {name!r} in {builder.data_dir} ({err!r}). "
                "Preparing a catalogue data set downloads it, and this machine may be offline: "
                "prepare it where there is network and copy the directory into data_dir."
            ) from err
    return builder.as_data_source(split=split)


def make_text_loader(
    name: str,
    split: str,
    batch_size: int,
    seed: int = 0,
    *,
    max_length: int = 1000,
    truncate: bool = False,
    prepend_cls: bool = False,
    text_key: str = "text",
    label_key: str = "label",
    data_dir: str | None = None,
    source: Sequence[Mapping[str, Any]] | None = None,
    **loader_kwargs: Any,
) -> grain.DataLoader:
    """Byte-level classification batches of a text data set (batch contract as the tasks).

    Batches have 'tokens', 'padding_mask', 'segment_ids' [B, max_length] and
    'label' [B]. ``source`` overrides the TFDS source (any sequence of records
    with ``text_key`` / ``label_key``); ``loader_kwargs`` go to
    :func:`pipeline.loader_from_source` (shuffle, num_epochs, shard_options, ...).
    """
    if source is None:
        source = standard_source(name, split, data_dir)
    ops = [
        ByteTokenize(max_length - int(prepend_cls), truncate, text_key, label_key),
        pipeline.FormatExample("classification", max_length, BYTE_CLS_ID if prepend_cls else None),
    ]
    return pipeline.loader_from_source(source, ops, batch_size, seed, **loader_kwargs)
