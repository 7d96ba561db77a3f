"""Character-level language modelling text, built offline from Python sources on this machine.

Source: every ``*.py`` file under ``source_dir`` -- by default the standard
library of the running interpreter (``sysconfig.get_paths()['stdlib']``) --
skipping directories named ``test``, ``tests``, ``idle_test`` and
``site-packages``. Files are taken in sorted relative-path order and each goes
to one split by a hash of its relative path (90% train, 5% validation, 5%
test), so held-out text comes from files the model never saw. A split's text
is its files concatenated, each followed by :data:`FILE_SEP`.

Vocabulary (V = 128, one id per byte): ASCII bytes keep their value (``'a'``
is 97, newline 10); 0 is padding; NUL and every non-ASCII byte (UTF-8 parts
of non-English text) become :data:`UNK_ID` = 127 (DEL, absent from source).
:func:`encode` / :func:`decode` convert.

Examples (the 'token' batch contract of :mod:`globalattn.data.pipeline`):
chunk c of a split covers text ids ``[c*T, c*T + T]`` -- T + 1 characters, so
consecutive chunks share one -- stored as ``tokens`` (the first T),
``labels`` (the next character of each position, the last T), ``label_mask``
(all True) and ``index`` = c. :func:`split_text` puts a prepared split back
together as one contiguous text (the held-out streams of the sinks experiment).

Determinism: the data are a pure function of the config and the source files.
Standard libraries differ between Python versions, so the config records the
version (``python_version``): a data dir prepared under another version is
refused by :func:`globalattn.data.get_builder` instead of being silently mixed.
The builder is registered as ``'charlm'`` in :data:`globalattn.data.BUILDERS`
like every task; prepare once with
``python -m globalattn.data prepare charlm [CONFIG] --data_dir DIR``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from typing import Any, Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders

__all__ = [
    "CharLm", "CharLmConfig", "FILE_SEP", "PAD_ID", "UNK_ID", "VOCAB_SIZE", "corpus_files",
    "decode", "encode", "make_loader", "prepare", "resolve_config", "split_ids", "split_of",
    "split_text",
]

VOCAB_SIZE = 128
PAD_ID = 0
UNK_ID = 127
FILE_SEP = 28  # ASCII "file separator": ends every source file in a split's text
EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages")
_SPLIT_PERCENT = {"train": (0, 90), "validation": (90, 95), "test": (95, 100)}


def encode(text: str | bytes) -> np.ndarray:
    """Text (str as UTF-8, or bytes) -> int32 ids in [1, 128) (see the module docstring)."""
    raw = np.frombuffer(text.encode("utf-8") if isinstance(text, str) else bytes(text), np.uint8)
    ids = raw.astype(np.int32)
    return np.where((ids == 0) | (ids >= VOCAB_SIZE), UNK_ID, ids).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Ids -> text; padding is dropped, UNK shows as U+FFFD, FILE_SEP as a form feed line."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
        if i == PAD_ID:
            continue
        out.append("\ufffd" if i == UNK_ID else "\n\f\n" if i == FILE_SEP else chr(i))
    return "".join(out)


def split_of(relpath: str) -> str:
    """The split a source file belongs to: a stable hash of its relative path."""
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    for split, (lo, hi) in _SPLIT_PERCENT.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)


def default_source_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files(source_dir: str) -> list[str]:
    """Sorted relative paths of the ``*.py`` files used (test suites excluded)."""
    if not os.path.isdir(source_dir):
        raise ValueError(f"charlm source_dir {source_dir!r} is not a directory")
    out = []
    for d, dirs, files in os.walk(source_dir):
        dirs[:] = [x for x in dirs if x not in EXCLUDED_DIRS]
        rel = os.path.relpath(d, source_dir)
        out += [f if rel == "." else os.path.join(rel, f) for f in files if f.endswith(".py")]
    return sorted(out)


@dataclasses.dataclass(eq=False)
class CharLmConfig(builders.TaskConfig):
    """Character LM parameters; split sizes count chunks of ``seq_len`` characters.

    Attributes:
      seq_len: T, characters per example (plus one for the last label).
      source_dir: root of the ``*.py`` files; '' = this interpreter's standard library.
      python_version: the version whose standard library the default source is;
        checked against the running interpreter when ``source_dir`` is ''.
    """

    seq_len: int = 128
    source_dir: str = ""
    python_version: str = sysconfig.get_python_version()

    def resolved_source_dir(self) -> str:
        return self.source_dir or default_source_dir()

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind="token", vocab_size=VOCAB_SIZE,
                                     num_classes=VOCAB_SIZE, max_length=self.seq_len,
                                     pad_id=PAD_ID, cls_id=None)

    def validate(self) -> None:
        super().validate()
        if self.seq_len < 2:
            raise ValueError(f"charlm seq_len must be >= 2, got {self.seq_len}")
        here = sysconfig.get_python_version()
        if not self.source_dir and self.python_version != here:
            raise ValueError(
                f"charlm config {self.name!r} is the Python {self.python_version} standard "
                f"library, but this is Python {here}: its text would differ; use "
                f"python_version={here!r} (a new data set) or point source_dir at the sources")


def split_ids(cfg: CharLmConfig, split: str) -> np.ndarray:
    """The first ``num * T + 1`` ids of a split's text, straight from the source files."""
    num = cfg.split_sizes().get(split, 0)
    need = num * cfg.seq_len + 1
    root = cfg.resolved_source_dir()
    parts, have = [], 0
    for rel in corpus_files(root):
        if split_of(rel) != split:
            continue
        with open(os.path.join(root, rel), "rb") as f:
            ids = encode(f.read())
        parts += [ids, np.array([FILE_SEP], np.int32)]
        have += ids.size + 1
        if have >= need:
            break
    if have < need:
        raise ValueError(
            f"charlm {cfg.name!r}: split {split!r} of {root} has {have} characters, fewer than "
            f"the {need} that num_{split}={num} chunks of seq_len={cfg.seq_len} need "
            f"(at most {(have - 1) // cfg.seq_len} chunks)")
    return np.concatenate(parts)[:need]


class CharLm(builders.SyntheticTaskBuilder):
    """Character-level LM chunks of Python source (see the module docstring)."""

    name = "charlm"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Byte-level ASCII chunks of the Python standard library."}
    BUILDER_CONFIGS = [
        CharLmConfig(name="stdlib_t128", description="T=128; 5.1M training characters.",
                     seq_len=128, num_train=40_000, num_validation=1_000, num_test=2_000),
        CharLmConfig(name="tiny", description="T=32, a few thousand characters (tests).",
                     seq_len=32, num_train=128, num_validation=16, num_test=64),
    ]

    def _task_features(self) -> dict:
        t = self.builder_config.seq_len
        return {
            "tokens": tfds.features.Tensor(shape=(t,), dtype=np.uint8),
            "labels": tfds.features.Tensor(shape=(t,), dtype=np.uint8),
            "label_mask": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
            "index": tfds.features.Scalar(dtype=np.int32),
        }

    def _make_split(self, split: str, size: int) -> list[dict]:
        T = self.builder_config.seq_len
        ids = split_ids(self.builder_config, split).astype(np.uint8)
        mask = np.ones(T, bool)
        return [{"tokens": ids[c * T:(c + 1) * T], "labels": ids[c * T + 1:(c + 1) * T + 1],
                 "label_mask": mask, "index": np.int32(c)} for c in range(size)]


def resolve_config(config: Any = None) -> CharLmConfig:
    """``globalattn.data.resolve_config('charlm', config)``."""
    from globalattn.data import pipeline  # the registry imports this module
    return pipeline.resolve_config(CharLm.name, config)


def prepare(config: Any = None, data_dir: str | None = None) -> CharLm:
    """``globalattn.data.prepare('charlm', config, data_dir)``: generates the splits once."""
    from globalattn.data import pipeline  # the registry imports this module
    return pipeline.prepare(CharLm.name, config, data_dir)


def make_loader(split: str, batch_size: int, seed: int = 0, **kwargs: Any) -> grain.DataLoader:
    """``globalattn.data.make_loader('charlm', ...)``: batches of the 'token' contract."""
    from globalattn.data import pipeline  # the registry imports this module
    return pipeline.make_loader(CharLm.name, split, batch_size, seed, **kwargs)


def split_text(split: str, config: Any = None, data_dir: str | None = None) -> np.ndarray:
    """A prepared split as one contiguous int32 text ``[num * T + 1]`` (chunks in order)."""
    builder = prepare(config, data_dir)
    source = builder.as_data_source(split=split)
    chunks = sorted((int(r["index"]), r) for r in (source[i] for i in range(len(source))))
    if [c for c, _ in chunks] != list(range(len(chunks))):
        raise ValueError(f"{builder.data_dir}/{split}: chunk indices are not 0..{len(chunks) - 1}")
    body = [np.asarray(r["tokens"], np.int32) for _, r in chunks]
    return np.concatenate(body + [np.asarray(chunks[-1][1]["labels"][-1:], np.int32)])
