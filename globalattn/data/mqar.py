"""MQAR: multi-query associative recall (Zoology, Arora et al. 2023), re-implemented.

Layout of one sequence of length T over a vocabulary of size V (0 is padding,
never used inside a sequence):

  positions 0 .. 2K-1   ``k_1 v_1 k_2 v_2 ... k_K v_K``: K distinct keys from
                        [1, V/2), each followed by its value from [V/2, V)
                        (values distinct too);
  positions 2K .. T-1   the query region: ``num_queries`` keys seen earlier, each
                        queried once at most, placed at offsets ``g - 1`` after
                        2K where the gaps ``g`` are drawn without replacement
                        with probability proportional to ``g ** (power_a - 1)``
                        (a power law: small ``power_a`` puts most queries near
                        the key-value block, a few far away); every other
                        position holds a uniform random token from [1, V).

Labels: ``labels[t]`` is the value paired with the key at query position t and
0 elsewhere; ``label_mask[t]`` is True exactly at query positions. A filler
token may happen to equal a key; it is not a query and is not scored, so every
scored label is determined by the key-value block alone.

Numpy's Generator is used for speed: the data are deterministic given the
config for a fixed numpy version (numpy does not promise stream stability
across versions, which does not matter once a data set is prepared on disk).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders


@dataclasses.dataclass(eq=False)
class MqarConfig(builders.TaskConfig):
    """MQAR parameters.

    Attributes:
      vocab_size: V (even); keys in [1, V/2), values in [V/2, V).
      seq_len: T, the (fixed) sequence length.
      num_pairs: K, number of key-value pairs.
      num_queries: queries per sequence (0 means K, Zoology's choice).
      power_a: exponent parameter of the gap distribution p(g) ~ g^(power_a - 1).
    """

    vocab_size: int = 256
    seq_len: int = 128
    num_pairs: int = 8
    num_queries: int = 0
    power_a: float = 0.01

    @property
    def queries(self) -> int:
        return self.num_queries or self.num_pairs

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind="token", vocab_size=self.vocab_size,
                                     num_classes=self.vocab_size, max_length=self.seq_len)

    def validate(self) -> None:
        super().validate()
        v, t, k, q = self.vocab_size, self.seq_len, self.num_pairs, self.queries
        if v % 2 or v < 4:
            raise ValueError(f"vocab_size must be even and >= 4, got {v}")
        if not 1 <= k <= v // 2 - 1:
            raise ValueError(f"num_pairs={k} needs 1 <= K <= V/2 - 1 = {v // 2 - 1} distinct keys")
        if not 1 <= q <= k:
            raise ValueError(f"num_queries={q} must be in [1, num_pairs={k}]")
        if t < 2 * k + q:
            raise ValueError(f"seq_len={t} < 2*num_pairs + num_queries = {2 * k + q}")
        if self.power_a <= 0:
            raise ValueError(f"power_a must be > 0, got {self.power_a}")


def generate_split(cfg: MqarConfig, split: str, size: int) -> list[dict]:
    """``size`` MQAR examples for one split.

    Returns:
      list of {'tokens': int32 [T], 'labels': int32 [T], 'label_mask': bool [T]}.
    """
    rng = np.random.default_rng(builders.derive_seed(cfg.seed, "mqar", split))
    v, t, k, q = cfg.vocab_size, cfg.seq_len, cfg.num_pairs, cfg.queries
    region = t - 2 * k
    gaps = np.arange(1, region + 1, dtype=np.float64)
    gap_p = gaps ** (cfg.power_a - 1.0)
    gap_p /= gap_p.sum()
    out = []
    for _ in range(size):
        keys = rng.choice(np.arange(1, v // 2), size=k, replace=False)
        values = rng.choice(np.arange(v // 2, v), size=k, replace=False)
        tokens = rng.integers(1, v, size=t)
        tokens[0 : 2 * k : 2] = keys
        tokens[1 : 2 * k : 2] = values
        positions = 2 * k + rng.choice(region, size=q, replace=False, p=gap_p)
        which = rng.choice(k, size=q, replace=False)
        tokens[positions] = keys[which]
        labels = np.zeros(t, np.int32)
        labels[positions] = values[which]
        mask = np.zeros(t, bool)
        mask[positions] = True
        out.append({"tokens": tokens.astype(np.int32), "labels": labels, "label_mask": mask})
    return out


class Mqar(builders.SyntheticTaskBuilder):
    """MQAR (Zoology) as a TFDS builder; fixed-length token-labelled examples."""

    name = "mqar"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Zoology-style MQAR with power-law query gaps."}
    BUILDER_CONFIGS = [
        MqarConfig(name=f"v256_t128_k{k}", description=f"V=256, T=128, K={k}.",
                   num_pairs=k, num_train=20_000, num_validation=1_000, num_test=1_000)
        for k in (8, 4, 16)
    ] + [
        # CPU-sized task sizes for the global-count ablation (reproduce global_count).
        MqarConfig(name=f"v64_t64_k{k}", description=f"V=64, T=64, K={k}.", vocab_size=64,
                   seq_len=64, num_pairs=k, num_train=20_000, num_validation=500,
                   num_test=1_000)
        for k in (2, 4, 8)
    ] + [
        MqarConfig(name="tiny", description="V=64, T=32, K=4, a few hundred examples (tests).",
                   vocab_size=64, seq_len=32, num_pairs=4,
                   num_train=300, num_validation=50, num_test=50),
    ]

    def _task_features(self) -> dict:
        t = self.builder_config.seq_len
        return {
            "tokens": tfds.features.Tensor(shape=(t,), dtype=np.int32),
            "labels": tfds.features.Tensor(shape=(t,), dtype=np.int32),
            "label_mask": tfds.features.Tensor(shape=(t,), dtype=np.bool_),
        }

    def _make_split(self, split: str, size: int) -> list[dict]:
        return generate_split(self.builder_config, split, size)
