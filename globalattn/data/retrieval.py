"""Long-range retrieval: the CLS token at position 0 must report a value far away.

Layout of one sequence of length T (no padding, segment ids all 0):

  position 0                 CLS, the readout (classification uses its output);
  positions 1 .. T-1         i.i.d. uniform filler tokens, except
  position m                 the MARKER token, with m drawn uniformly from
                             [min_distance, T-2], and
  position m + 1             the VALUE token: one of ``num_classes`` value ids;
                             the label is its index, uniform over the classes;
  ``num_distractors``        further value tokens at other positions >= min_distance;
                             only the value right after MARKER counts, so with
                             distractors a model must use the marker.

Guarantee (why windows fail and a global token succeeds):
  * Every position p < min_distance holds CLS or an i.i.d. filler token, drawn
    independently of the label. After L layers of sliding-window attention with
    radius w (position i attends to |i - j| <= w) the readout at position 0 is
    a function of input positions 0 .. L*w only. So if ``L * w < min_distance``
    its output is independent of the label and the expected accuracy is exactly
    chance, 1 / num_classes, whatever the weights (:func:`window_cannot_solve`).
  * With CLS made global it attends to every position in one layer. Without
    distractors the value token is the only value id in the sequence, so one
    layer suffices; with distractors, layer 1 lets the value token see the
    marker at distance 1 (any w >= 1) and layer 2 lets CLS read it: 2 layers.

The default config is T=64 with min_distance=32, so a 2-layer model with
window radius 4 (reach 8) is provably at chance while the global CLS can solve
it (REFERENCE: 100% after ~400 steps at lr 2e-3).

Vocabulary: 0 pad, 1 CLS, 2 MARKER, 3 .. 3+C-1 values, then ``num_fillers`` filler ids.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders

PAD_ID = 0
CLS_ID = 1
MARKER_ID = 2
VALUE_OFFSET = 3


@dataclasses.dataclass(eq=False)
class RetrievalConfig(builders.TaskConfig):
    """Long-range retrieval parameters.

    Attributes:
      seq_len: T, including the CLS at position 0.
      num_classes: C, number of value ids (and of label classes).
      num_fillers: size of the filler vocabulary.
      min_distance: the marker and value lie at positions >= min_distance; any
        readout whose receptive field is [0, min_distance) is at chance.
      num_distractors: extra value tokens placed at positions >= min_distance.
    """

    seq_len: int = 64
    num_classes: int = 8
    num_fillers: int = 16
    min_distance: int = 32
    num_distractors: int = 0

    @property
    def vocab_size(self) -> int:
        return VALUE_OFFSET + self.num_classes + self.num_fillers

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind="classification", vocab_size=self.vocab_size,
                                     num_classes=self.num_classes, max_length=self.seq_len,
                                     pad_id=PAD_ID, cls_id=CLS_ID)

    def validate(self) -> None:
        super().validate()
        if self.num_classes < 2 or self.num_fillers < 1:
            raise ValueError(f"need num_classes >= 2 and num_fillers >= 1, got "
                             f"{self.num_classes}, {self.num_fillers}")
        if not 1 <= self.min_distance <= self.seq_len - 2:
            raise ValueError(f"min_distance={self.min_distance} must be in [1, seq_len - 2 = "
                             f"{self.seq_len - 2}] so the marker and value fit")
        room = self.seq_len - self.min_distance - 2  # positions left after marker+value
        if not 0 <= self.num_distractors <= room:
            raise ValueError(f"num_distractors={self.num_distractors} does not fit in the "
                             f"{room} free positions at or beyond min_distance")


def window_cannot_solve(num_layers: int, radius: int, cfg: RetrievalConfig) -> bool:
    """True if an L-layer sliding window of radius w is provably at chance on ``cfg``.

    The readout at position 0 sees input positions 0 .. L*w; all of those are
    label-independent iff L*w < min_distance.
    """
    return num_layers * radius < cfg.min_distance


def generate_split(cfg: RetrievalConfig, split: str, size: int) -> list[dict]:
    """``size`` examples for one split: {'tokens': int32 [T], 'label': int}."""
    rng = np.random.default_rng(builders.derive_seed(cfg.seed, "retrieval", split))
    t, c = cfg.seq_len, cfg.num_classes
    filler0 = VALUE_OFFSET + c
    out = []
    for _ in range(size):
        tokens = rng.integers(filler0, filler0 + cfg.num_fillers, size=t)
        tokens[0] = CLS_ID
        marker = int(rng.integers(cfg.min_distance, t - 1))
        label = int(rng.integers(c))
        tokens[marker] = MARKER_ID
        tokens[marker + 1] = VALUE_OFFSET + label
        if cfg.num_distractors:
            free = np.setdiff1d(np.arange(cfg.min_distance, t), [marker, marker + 1])
            spots = rng.choice(free, size=cfg.num_distractors, replace=False)
            tokens[spots] = VALUE_OFFSET + rng.integers(c, size=cfg.num_distractors)
        out.append({"tokens": tokens.astype(np.int32), "label": label})
    return out


class LongRangeRetrieval(builders.SyntheticTaskBuilder):
    """Long-range retrieval as a TFDS builder; the CLS readout must fetch a far value."""

    name = "long_range_retrieval"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Marker + value beyond min_distance, readout at CLS (position 0)."}
    BUILDER_CONFIGS = [
        RetrievalConfig(name="t64", description="T=64, 8 classes, value at >= 32.",
                        num_train=20_000, num_validation=1_000, num_test=1_000),
        RetrievalConfig(name="t64_distract", description="As t64 with 4 distractor values.",
                        num_distractors=4, num_train=20_000, num_validation=1_000, num_test=1_000),
        RetrievalConfig(name="t128", description="T=128, 16 classes, value at >= 64.",
                        seq_len=128, num_classes=16, min_distance=64,
                        num_train=20_000, num_validation=1_000, num_test=1_000),
        RetrievalConfig(name="tiny", description="T=32, value at >= 16 (tests).",
                        seq_len=32, min_distance=16,
                        num_train=300, num_validation=50, num_test=50),
    ]

    def _task_features(self) -> dict:
        return {
            "tokens": tfds.features.Tensor(shape=(self.builder_config.seq_len,), dtype=np.int32),
            "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
        }

    def _make_split(self, split: str, size: int) -> list[dict]:
        return generate_split(self.builder_config, split, size)
