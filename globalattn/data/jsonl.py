"""Pre-tokenised local data: the ``jsonl`` task, a directory of JSON Lines files.

For fine-tuning a pretrained checkpoint on a real corpus (TriviaQA, IMDB,
Hyperpartisan, ...) tokenised beforehand with the checkpoint's tokenizer. The
task config is the directory itself::

    --config.data.name=jsonl --config.data.config=/data/imdb_roberta

    data.make_loader("jsonl", "train", 32, config="/data/imdb_roberta", data_dir=TFDS_DIR)

Directory layout::

    metadata.json       what the lines cannot tell (see below)
    train.jsonl         one example per line (required)
    validation.jsonl    (required)
    test.jsonl          (optional; without it the task has no 'test' split)

``metadata.json`` (every field an int unless noted; unknown fields are errors)::

    {"kind": "classification",   # or "span" (extractive QA)
     "vocab_size": 50265,        # every token id is in [0, vocab_size)
     "max_length": 4096,         # T: the padded length; a longer line is an error
     "num_classes": 2,           # classification only: labels in [0, num_classes)
     "max_question_length": 64,  # span only: most question (segment 0) tokens per line
     "cls_id": 0}                # optional (default null): id data.prepend_cls prepends

Lines (an optional ``"id"`` of any JSON type is allowed and ignored, e.g. the
TriviaQA question id; the stored order is the file order)::

    classification  {"tokens": [0, 713, 1569, 2], "label": 1}
    span            {"tokens": [0, 99, 2, 2, 45, 46, 2], "segment_ids": [0, 0, 0, 0, 1, 1, 1],
                     "start": 4, "end": 5}

``tokens`` are the model's input ids exactly (special tokens included: the
pipeline adds nothing unless ``data.prepend_cls``) and are padded with 0 up to
``max_length`` with ``padding_mask`` marking the real ones (a converted
checkpoint takes its positions from the mask, so the tokenizer's pad id never
has to appear). For span QA, ``segment_ids`` follow the ``span_qa`` task's
convention: 0 on the question (with its special tokens -- the tokens strategy
``'task'`` makes global), 1 on the context; ``start`` / ``end`` are the
inclusive token positions of the answer in ``tokens`` (0 <= start <= end <
len(tokens); pointing at ``<s>`` is allowed, the usual "no answer" label).

Conversion: the first use (or ``python -m globalattn.data prepare jsonl DIR
--data_dir TFDS_DIR``, which a multi-host job runs once first) reads every line,
validates it strictly and writes it as array_record under
``<data_dir>/jsonl/<dirname>_<digest>/1.0.0/``, in file order. Any problem is a
ValueError naming the file, the line number (1-based) and the values: a
missing, unknown or non-int field, a token id outside the vocabulary, more
tokens than ``max_length``, a label outside ``[0, num_classes)``, a span
outside the tokens, ``segment_ids`` of another length or with values other
than 0 / 1, too many question tokens, an empty or malformed line. Nothing is
truncated or dropped.

The digest is a SHA-256 of ``metadata.json`` and of every split file's bytes
(read once per process: one to two seconds per GB), so an edited file is converted
anew, never served stale, and a copy of the same files on every host of a pod
(at any path) names the same prepared data set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders

METADATA = "metadata.json"
REQUIRED_SPLITS = ("train", "validation")
KINDS = ("classification", "span")
QUESTION_SEGMENT = 0  # span_qa's convention: 0 question, 1 context
_META_FIELDS = {"kind", "vocab_size", "max_length", "num_classes", "max_question_length", "cls_id"}
_LINE_FIELDS = {"classification": ("tokens", "label"),
                "span": ("tokens", "segment_ids", "start", "end")}
_OPTIONAL_LINE_FIELDS = {"id"}
_CHUNK = 1 << 24


def split_file(source_dir: str, split: str) -> str:
    return os.path.join(source_dir, f"{split}.jsonl")


@dataclasses.dataclass(eq=False)
class JsonlConfig(builders.TaskConfig):
    """A JSONL directory resolved: its metadata, split sizes and content digest.

    Build it with :func:`config_from_dir` (what ``resolve_config('jsonl', DIR)``
    does); the split sizes (``num_train`` ...) are the files' line counts.

    Attributes:
      source_dir: the absolute directory (not a parameter: the digest identifies the data).
      kind, vocab_size, max_length, num_classes, max_question_length, cls_id: from
        ``metadata.json`` (see the module docstring).
      digest: SHA-256 (hex) of metadata.json and the split files.
    """

    source_dir: str = ""
    kind: str = "classification"
    vocab_size: int = 0
    max_length: int = 0
    num_classes: int | None = None
    max_question_length: int | None = None
    cls_id: int | None = None
    digest: str = ""

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind=self.kind, vocab_size=self.vocab_size,
                                     num_classes=self.num_classes, max_length=self.max_length,
                                     pad_id=0, cls_id=self.cls_id)

    def params(self) -> dict[str, Any]:
        out = super().params()
        del out["source_dir"]  # the same files at another path are the same data set
        return out

    def validate(self) -> None:
        super().validate()
        missing = [s for s in REQUIRED_SPLITS if not self.split_sizes().get(s)]
        if missing:
            raise ValueError(f"{self.source_dir}: no examples in {[f'{s}.jsonl' for s in missing]}")


def _int(value: Any) -> bool:
    return type(value) is int  # not bool, not float


def _read_metadata(source_dir: str) -> dict[str, Any]:
    path = os.path.join(source_dir, METADATA)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(meta).__name__}")
    where = f"{path}:"
    unknown = sorted(set(meta) - _META_FIELDS)
    if "pad_id" in unknown:
        raise ValueError(f"{where} 'pad_id' is not a field: batches are padded with 0 and "
                         "'padding_mask' marks the real tokens (a converted checkpoint takes its "
                         "positions from the mask), so remove it")
    if unknown:
        raise ValueError(f"{where} unknown fields {unknown}; valid: {sorted(_META_FIELDS)}")
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where} 'kind' must be one of {list(KINDS)}, got {kind!r}")
    required = ["vocab_size", "max_length"]
    required += ["num_classes"] if kind == "classification" else ["max_question_length"]
    for name in required:
        if name not in meta:
            raise ValueError(f"{where} missing field {name!r} (required for kind {kind!r})")
    out = {"kind": kind}
    for name, lo in (("vocab_size", 1), ("max_length", 1), ("num_classes", 2),
                     ("max_question_length", 0), ("cls_id", 0)):
        value = meta.get(name)
        if value is None and name not in required:
            out[name] = None
            continue
        if not _int(value) or value < lo:
            raise ValueError(f"{where} {name!r} must be an int >= {lo}, got {value!r}")
        out[name] = value
    if kind == "span" and out["num_classes"] is not None:
        raise ValueError(f"{where} 'num_classes' is for kind 'classification', not 'span'")
    if kind == "classification" and out["max_question_length"] is not None:
        raise ValueError(f"{where} 'max_question_length' is for kind 'span', not 'classification'")
    if out["cls_id"] is not None and out["cls_id"] >= out["vocab_size"]:
        raise ValueError(f"{where} 'cls_id'={out['cls_id']} is outside the vocabulary "
                         f"[0, {out['vocab_size']})")
    if kind == "span" and out["max_question_length"] > out["max_length"]:
        raise ValueError(f"{where} 'max_question_length'={out['max_question_length']} > "
                         f"'max_length'={out['max_length']}")
    return out


# (path, size, mtime_ns, inode) -> (sha256 of the bytes, line count): hashing a large
# file once per process, however often the config is resolved.
_SCAN_CACHE: dict[tuple, tuple[str, int]] = {}


def _scan(path: str) -> tuple[str, int]:
    """(SHA-256 hex, number of lines) of a file; a last line without newline counts."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _SCAN_CACHE:
        h, lines, last = hashlib.sha256(), 0, b"\n"
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
        _SCAN_CACHE[key] = (h.hexdigest(), lines + (last != b"\n"))
    return _SCAN_CACHE[key]


def config_from_dir(source_dir: str) -> JsonlConfig:
    """The :class:`JsonlConfig` of a JSONL directory (metadata checked; lines are checked
    when the data set is prepared).

    Raises:
      ValueError: no such directory, a missing file, invalid metadata.json, an empty split.
    """
    if not source_dir:
        raise ValueError("task 'jsonl' needs its directory as the config, e.g. "
                         "--config.data.config=/data/imdb_tok (with metadata.json, train.jsonl, "
                         "validation.jsonl and optionally test.jsonl; see globalattn.data.jsonl)")
    source_dir = os.path.abspath(os.path.expanduser(source_dir))
    if not os.path.isdir(source_dir):
        raise ValueError(f"task 'jsonl': {source_dir} is not a directory (the config of task "
                         "'jsonl' is the directory of its JSONL files)")
    required = [METADATA] + [f"{s}.jsonl" for s in REQUIRED_SPLITS]
    missing = [f for f in required if not os.path.isfile(os.path.join(source_dir, f))]
    if missing:
        raise ValueError(f"{source_dir}: missing {missing} (a jsonl task directory holds "
                         f"{required} and optionally test.jsonl)")
    meta = _read_metadata(source_dir)
    digest = hashlib.sha256()
    with open(os.path.join(source_dir, METADATA), "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())
    sizes = {}
    for split in builders.SPLITS:
        path = split_file(source_dir, split)
        if split not in REQUIRED_SPLITS and not os.path.exists(path):
            sizes[split] = 0
            continue
        file_digest, lines = _scan(path)
        if lines == 0:
            raise ValueError(f"{path} is empty" + ("" if split in REQUIRED_SPLITS
                                                   else "; remove it or fill it"))
        digest.update(f"{split}:{file_digest}".encode())
        sizes[split] = lines
    hexdigest = digest.hexdigest()
    base = re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(source_dir)).strip("_").lower() or "data"
    return JsonlConfig(
        name=f"{base}_{hexdigest[:12]}",
        description=f"JSONL files of {source_dir}",
        source_dir=source_dir, digest=hexdigest,
        num_train=sizes["train"], num_validation=sizes["validation"], num_test=sizes["test"],
        **meta,
    )


def _check_int_list(values: Any, where: str, field: str, lo: int, hi: int) -> np.ndarray:
    """``values`` as int32 if it is a non-empty list of ints in [lo, hi); else ValueError."""
    if not isinstance(values, list):
        raise ValueError(f"{where} {field!r} must be a list of ints, got {type(values).__name__}")
    if not values:
        raise ValueError(f"{where} {field!r} is empty")
    if not set(map(type, values)) <= {int}:
        bad = next((i, v) for i, v in enumerate(values) if type(v) is not int)
        raise ValueError(f"{where} {field!r}[{bad[0]}] = {bad[1]!r} is not an int")
    try:
        arr = np.array(values, dtype=np.int64)  # exact: every value is an int
    except OverflowError:
        arr = np.array(values, dtype=object)  # beyond int64: reported as out of range below
    out_of_range = np.flatnonzero((arr < lo) | (arr >= hi))
    if out_of_range.size:
        i = int(out_of_range[0])
        raise ValueError(f"{where} {field!r}[{i}] = {values[i]} is outside [{lo}, {hi}) "
                         f"({out_of_range.size} such values)")
    return arr.astype(np.int32)


def parse_line(line: bytes | str, cfg: JsonlConfig, where: str) -> dict[str, Any]:
    """One validated stored example of a line (see the module docstring for the rules).

    ``where`` prefixes every error (``'<file>:<line>:'``).
    """
    if not line.strip():
        raise ValueError(f"{where} empty line (one JSON object per line; remove it)")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(obj).__name__}")
    fields = _LINE_FIELDS[cfg.kind]
    missing = [f for f in fields if f not in obj]
    if missing:
        raise ValueError(f"{where} missing fields {missing} (a {cfg.kind!r} line has "
                         f"{list(fields)})")
    unknown = sorted(set(obj) - set(fields) - _OPTIONAL_LINE_FIELDS)
    if unknown:
        raise ValueError(f"{where} unknown fields {unknown}; a {cfg.kind!r} line has "
                         f"{list(fields)} and optionally {sorted(_OPTIONAL_LINE_FIELDS)}")
    tokens = _check_int_list(obj["tokens"], where, "tokens", 0, cfg.vocab_size)
    n = len(tokens)
    if n > cfg.max_length:
        raise ValueError(f"{where} {n} tokens > max_length={cfg.max_length} ({METADATA}); "
                         "nothing is truncated: shorten the line or raise max_length")
    if cfg.kind == "classification":
        label = obj["label"]
        if not _int(label) or not 0 <= label < cfg.num_classes:
            raise ValueError(f"{where} 'label' = {label!r} is not an int in "
                             f"[0, num_classes={cfg.num_classes})")
        return {"tokens": tokens, "label": label}
    segments = _check_int_list(obj["segment_ids"], where, "segment_ids", 0, 2)
    if len(segments) != n:
        raise ValueError(f"{where} 'segment_ids' has {len(segments)} entries but 'tokens' has {n}")
    question = int(np.sum(segments == QUESTION_SEGMENT))
    if question > cfg.max_question_length:
        raise ValueError(f"{where} {question} question tokens (segment_ids == "
                         f"{QUESTION_SEGMENT}) > max_question_length={cfg.max_question_length} "
                         f"({METADATA})")
    start, end = obj["start"], obj["end"]
    for name, value in (("start", start), ("end", end)):
        if not _int(value):
            raise ValueError(f"{where} {name!r} = {value!r} is not an int")
    if not 0 <= start <= end < n:
        raise ValueError(f"{where} span start={start}, end={end} is not within the {n} tokens "
                         "(need 0 <= start <= end < len(tokens); end is inclusive)")
    return {"tokens": tokens, "segment_ids": segments, "start": start, "end": end}


def read_split(cfg: JsonlConfig, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, example)`` for every line of a split file, validated, in file order."""
    path = split_file(cfg.source_dir, split)
    count = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            yield count, parse_line(line, cfg, f"{path}:{lineno}:")
            count += 1
    expected = cfg.split_sizes().get(split, 0)
    if count != expected:
        raise ValueError(f"{path}: has {count} lines but {expected} were counted when the "
                         "config was resolved; was it modified meanwhile?")


class Jsonl(builders.SyntheticTaskBuilder):
    """Pre-tokenised examples from a directory of JSON Lines files (see the module docstring)."""

    name = "jsonl"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Classification and span QA lines, validated, in file order."}
    BUILDER_CONFIGS: list = []  # the config is a directory: see config_from_string

    @staticmethod
    def config_from_string(value: str) -> JsonlConfig:
        """``resolve_config('jsonl', DIR)``: the config is the JSONL directory."""
        return config_from_dir(value)

    DISABLE_SHUFFLING = True  # keys are line indices: record i is line i+1 of its file

    def _task_features(self) -> dict:
        cfg = self.builder_config
        out = {"tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32)}
        if cfg.kind == "classification":
            out["label"] = tfds.features.Scalar(dtype=np.int32)
        else:
            out["segment_ids"] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
            out["start"] = tfds.features.Scalar(dtype=np.int32)
            out["end"] = tfds.features.Scalar(dtype=np.int32)
        return out

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # local files
        cfg = self.builder_config
        cfg.validate()
        return {split: read_split(cfg, split) for split in cfg.split_sizes()}
