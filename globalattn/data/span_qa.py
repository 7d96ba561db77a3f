"""Synthetic extractive QA: find the value of the queried key in a long context.

Layout of one (unpadded) sequence:

  question, segment 0   ``CLS q_1 .. q_k SEP`` where ``q`` is a key of
                        ``key_length`` key tokens;
  context, segment 1    R records ``key_r value_r``; keys are R distinct
                        ``key_length``-tuples of key tokens, values are
                        ``U{min_value_length..max_value_length}`` value tokens.

The queried key is one of the R record keys (uniformly chosen); the answer is
the span of its value: ``start`` / ``end`` are the inclusive positions of the
value's first and last token in the full sequence. Key and value tokens come
from disjoint ranges and every value has at least one token, so a key tuple
occurs in the context exactly once and the answer is unambiguous.

Solving it needs question-to-context matching over the whole context (the
queried record is anywhere), which is what global tokens (CLS, or the question
tokens made global, as in Longformer QA) provide.

Vocabulary: 0 pad, 1 CLS, 2 SEP, ``3 .. 3+num_keys-1`` key tokens, then
``num_value_tokens`` value tokens.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders

PAD_ID = 0
CLS_ID = 1
SEP_ID = 2
KEY_OFFSET = 3


@dataclasses.dataclass(eq=False)
class SpanQaConfig(builders.TaskConfig):
    """Span QA parameters; ``max_length`` is derived (the worst-case length).

    Attributes:
      num_records: R, records in the context.
      key_length: tokens per key.
      num_keys: size of the key-token vocabulary (R distinct tuples must exist).
      num_value_tokens: size of the value-token vocabulary.
      min_value_length, max_value_length: value length range (inclusive).
    """

    num_records: int = 32
    key_length: int = 2
    num_keys: int = 16
    num_value_tokens: int = 32
    min_value_length: int = 1
    max_value_length: int = 4

    @property
    def vocab_size(self) -> int:
        return KEY_OFFSET + self.num_keys + self.num_value_tokens

    @property
    def max_question_length(self) -> int:
        """Tokens of segment 0 (the question: CLS, the key, SEP) in every example."""
        return 2 + self.key_length

    @property
    def max_length(self) -> int:
        return self.max_question_length + self.num_records * (self.key_length + self.max_value_length)

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind="span", vocab_size=self.vocab_size, num_classes=None,
                                     max_length=self.max_length, pad_id=PAD_ID, cls_id=CLS_ID)

    def validate(self) -> None:
        super().validate()
        if self.num_records < 1 or self.key_length < 1 or self.num_value_tokens < 1:
            raise ValueError(f"need num_records, key_length, num_value_tokens >= 1, got "
                             f"{self.num_records}, {self.key_length}, {self.num_value_tokens}")
        if self.num_keys ** self.key_length < self.num_records:
            raise ValueError(f"{self.num_keys}**{self.key_length} distinct keys cannot cover "
                             f"num_records={self.num_records}")
        if not 1 <= self.min_value_length <= self.max_value_length:
            raise ValueError(f"need 1 <= min_value_length <= max_value_length, got "
                             f"{self.min_value_length}, {self.max_value_length}")


def generate_split(cfg: SpanQaConfig, split: str, size: int) -> list[dict]:
    """``size`` examples for one split.

    Returns:
      list of {'tokens': int32 [n], 'segment_ids': int32 [n], 'start': int, 'end': int}.
    """
    rng = np.random.default_rng(builders.derive_seed(cfg.seed, "span_qa", split))
    r, kl = cfg.num_records, cfg.key_length
    value0 = KEY_OFFSET + cfg.num_keys
    out = []
    for _ in range(size):
        # Distinct keys as distinct integers in base num_keys, then digits -> tokens.
        codes = rng.choice(cfg.num_keys**kl, size=r, replace=False)
        keys = KEY_OFFSET + (codes[:, None] // cfg.num_keys ** np.arange(kl)[::-1]) % cfg.num_keys
        lengths = rng.integers(cfg.min_value_length, cfg.max_value_length + 1, size=r)
        answer = int(rng.integers(r))
        question = np.concatenate([[CLS_ID], keys[answer], [SEP_ID]])
        pieces, start = [question], len(question)
        for i in range(r):
            value = rng.integers(value0, value0 + cfg.num_value_tokens, size=lengths[i])
            if i == answer:
                span = (start + kl, start + kl + lengths[i] - 1)
            pieces += [keys[i], value]
            start += kl + lengths[i]
        tokens = np.concatenate(pieces).astype(np.int32)
        segments = np.ones_like(tokens)
        segments[: len(question)] = 0
        out.append({"tokens": tokens, "segment_ids": segments,
                    "start": int(span[0]), "end": int(span[1])})
    return out


class SpanQa(builders.SyntheticTaskBuilder):
    """Synthetic extractive span QA as a TFDS builder; labels are inclusive start/end."""

    name = "span_qa"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Key-value records context, question names a key."}
    BUILDER_CONFIGS = [
        SpanQaConfig(name="r32", description="32 records, 2-token keys, values of 1-4 tokens.",
                     num_train=20_000, num_validation=1_000, num_test=1_000),
        SpanQaConfig(name="r64", description="64 records (sequences up to 388 tokens).",
                     num_records=64, num_train=20_000, num_validation=1_000, num_test=1_000),
        SpanQaConfig(name="tiny", description="4 records, 1-token keys (tests).",
                     num_records=4, key_length=1, num_keys=8, num_value_tokens=8,
                     max_value_length=3, num_train=300, num_validation=50, num_test=50),
    ]

    def _task_features(self) -> dict:
        return {
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "segment_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "start": tfds.features.Scalar(dtype=np.int32),
            "end": tfds.features.Scalar(dtype=np.int32),
        }

    def _make_split(self, split: str, size: int) -> list[dict]:
        return generate_split(self.builder_config, split, size)
