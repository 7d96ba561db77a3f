"""Data for offline experiments: TFDS builders of locally generated tasks + grain pipelines.

Tasks (TFDS builder name -> configs, the first is the default):

* ``listops`` (:mod:`.listops`): LRA ListOps, ``]`` kept; configs 'lra'
  (500-2000 tokens, 96k/2k/2k), 'short' (100-256), 'tiny' (tests).
* ``mqar`` (:mod:`.mqar`): Zoology multi-query associative recall; configs
  'v256_t128_k8', 'v256_t128_k4', 'v256_t128_k16', 'tiny'.
* ``long_range_retrieval`` (:mod:`.retrieval`): CLS must fetch a value beyond
  ``min_distance``; provably at chance for windows with L*w < min_distance;
  configs 't64', 't64_distract', 't128', 'tiny'.
* ``charlm`` (:mod:`.charlm`): character-level LM text of Python sources (the
  causal LM's data); configs 'stdlib_t128', 'tiny'.
* ``span_qa`` (:mod:`.span_qa`): extractive QA over key-value records; configs
  'r32', 'r64', 'tiny'.
* ``charlm`` (:mod:`.charlm`): character-level language modelling on Python
  source text (next-character labels, 'token' kind); configs 'stdlib_t128', 'tiny'.
* ``jsonl`` (:mod:`.jsonl`): pre-tokenised local data (e.g. TriviaQA, IMDB in a
  checkpoint's vocabulary) for fine-tuning; the config is the directory of its
  ``metadata.json`` and ``train`` / ``validation`` [/ ``test``] ``.jsonl`` files,
  classification or span QA lines, validated strictly when converted.

Entry points (see :mod:`.pipeline` for the batch format):

* :func:`make_iterator` / :func:`make_loader` -- padded, shuffled, sharded
  numpy batches with a checkpointable position (``get_state`` / ``set_state``).
* :func:`get_builder`, :func:`prepare`, :func:`data_source` -- the TFDS side.
* :func:`task_metadata` -- vocab_size, num_classes, max_length, pad / CLS ids.
* :func:`make_text_loader` / :func:`standard_source` -- catalogue TFDS data sets
  (e.g. byte-level imdb_reviews) when online.

Any config can be given by name, as a TaskConfig, or as a dict of overrides
(e.g. ``{"base": "tiny", "num_train": 1000}``). Prepare from the shell with
``python -m globalattn.data prepare NAME [CONFIG] --data_dir DIR``.
"""
from globalattn.data import charlm
from globalattn.data.builders import TaskConfig, TaskMetadata
from globalattn.data.charlm import CharLmConfig
from globalattn.data.jsonl import JsonlConfig
from globalattn.data.listops import ListOpsConfig
from globalattn.data.mqar import MqarConfig
from globalattn.data.pipeline import (
    BUILDERS,
    FormatExample,
    data_source,
    get_builder,
    loader_from_source,
    make_iterator,
    make_loader,
    prepare,
    resolve_config,
    task_metadata,
)
from globalattn.data.retrieval import RetrievalConfig, window_cannot_solve
from globalattn.data.span_qa import SpanQaConfig
from globalattn.data.standard_tfds import ByteTokenize, make_text_loader, standard_source

BUILDERS[charlm.CharLm.name] = charlm.CharLm  # charlm imports pipeline: registered here

__all__ = [
    "BUILDERS",
    "ByteTokenize",
    "CharLmConfig",
    "FormatExample",
    "JsonlConfig",
    "ListOpsConfig",
    "MqarConfig",
    "RetrievalConfig",
    "SpanQaConfig",
    "TaskConfig",
    "TaskMetadata",
    "data_source",
    "get_builder",
    "loader_from_source",
    "make_iterator",
    "make_loader",
    "make_text_loader",
    "prepare",
    "resolve_config",
    "standard_source",
    "task_metadata",
    "window_cannot_solve",
]
