"""ListOps exactly as in Long Range Arena (Tay et al. 2020), with the bracket bug fixed.

The task: evaluate a nested expression over digits 0-9 with the operators
``[MAX``, ``[MIN``, ``[MED`` (numpy median, the mean of the two middle values
for an even count, truncated to int) and ``[SM`` (sum mod 10); every operator
node is closed by ``]``. The label is the value of the whole expression
(10 classes).

Generator (the LRA recipe, re-implemented): a node at depth ``d < max_depth``
draws ``r ~ U[0, 1)``; at ``d == max_depth`` it is forced to be a leaf. With
probability 0.75 (``r > 0.25``) it is a leaf (a uniform digit, length 1);
otherwise it is an operator node with ``k ~ U{2..max_args}`` children generated
at depth ``d + 1`` and a uniform operator; its length is 2 (operator and ``]``)
plus the children's lengths. The root sits at depth 1 and is kept only if
``min_length < length < max_length`` (strict). Duplicate trees are removed
across all splits, so train / validation / test are disjoint.

Efficiency: acceptance is low (about 8% for 500-2000 and about 2% for
100-256), and the branching process is supercritical (on average 1.5 children
per node), so a rejected tree can be enormous. We therefore abort a tree as
soon as its running length reaches ``max_length``: its final length can only
grow. Randomness comes only from ``random.Random.random()`` (whose output for a
given seed is stable across Python versions), seeded per chunk of examples, so
the data set is a deterministic function of the config and independent of how
many worker processes generate it (large configs use all cores through spawned
processes: about 4 minutes for 'lra' on 2 cores).

Tokenisation (and the LRA bug we do NOT reproduce): LRA's serialiser writes a
tree as nested parentheses, e.g. ``( ( ( [MAX 2 ) 9 ) ] )``, and the public LRA
input pipeline tokenises with a tokenizer that drops every non-alphanumeric
character, so the closing ``]`` vanishes and trees become ambiguous (LRA GitHub
issues #6 and #14). We drop the serialiser's parentheses, keep ``]`` as a
token and split on whitespace; then the token count equals the tree length.
:func:`to_lra_text` / :func:`tokenize_lra_text` make this explicit and are
tested to round-trip.

Vocabulary: ``0`` pad, ``1`` CLS (never in the stored sequence; the model or
the pipeline may prepend it), ``2..11`` digits 0-9, ``12..15`` operators
MIN / MAX / MED / SM, ``16`` ``]``.
"""
from __future__ import annotations

import dataclasses
import random
import numpy as np
import tensorflow_datasets as tfds

from globalattn.data import builders

PAD_ID = 0
CLS_ID = 1
DIGIT_OFFSET = 2  # digit d has id d + 2
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OP_OFFSET = 12  # OPERATORS[i] has id 12 + i
CLOSE_ID = 16
VOCAB_SIZE = 17
NUM_CLASSES = 10
_LEAF_PROBABILITY = 0.75  # LRA: r > 0.25 makes a leaf
# Accepted trees per independently seeded chunk. It is part of the data
# definition (chunk i always yields the same trees): changing it needs a VERSION bump.
_CHUNK = 256

ID_TO_TOKEN = {
    PAD_ID: "<pad>",
    CLS_ID: "<cls>",
    CLOSE_ID: "]",
    **{DIGIT_OFFSET + d: str(d) for d in range(10)},
    **{OP_OFFSET + i: op for i, op in enumerate(OPERATORS)},
}
TOKEN_TO_ID = {tok: i for i, tok in ID_TO_TOKEN.items()}


@dataclasses.dataclass(eq=False)
class ListOpsConfig(builders.TaskConfig):
    """ListOps parameters; lengths are strict bounds on the number of tokens.

    Attributes:
      max_depth: nodes at this depth are forced to be leaves (root is depth 1).
      max_args: maximum number of children of an operator node (minimum is 2).
      min_length, max_length: keep a tree iff min_length < length < max_length.
    """

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000

    def metadata(self) -> builders.TaskMetadata:
        return builders.TaskMetadata(kind="classification", vocab_size=VOCAB_SIZE,
                                     num_classes=NUM_CLASSES, max_length=self.max_length,
                                     pad_id=PAD_ID, cls_id=CLS_ID)

    def validate(self) -> None:
        super().validate()
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError(f"need max_depth >= 1 and max_args >= 2, got {self.max_depth}, {self.max_args}")
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(
                f"no integer length satisfies {self.min_length} < length < {self.max_length}"
            )


class _TooLong(Exception):
    """Raised inside the recursion to abandon a tree that reached max_length."""


def _apply(op: int, values: list[int]) -> int:
    """Value of operator ``op`` (index into OPERATORS) on its children's values."""
    if op == 0:
        return min(values)
    if op == 1:
        return max(values)
    if op == 2:
        s = sorted(values)
        n = len(s)
        # numpy median truncated to int; values are >= 0 so // truncates.
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    return sum(values) % 10


def sample_tree(rand: random.Random, cfg: ListOpsConfig) -> tuple[list[int], int] | None:
    """Draws one tree; returns (token ids, value) if its length is in bounds, else None.

    Token ids are in pre-order (``[OP child ... ]``); len(tokens) is the tree length.
    """
    tokens: list[int] = []
    uniform = rand.random
    max_depth, max_args, max_length = cfg.max_depth, cfg.max_args, cfg.max_length

    def grow(depth: int) -> int:
        r = uniform() if depth < max_depth else 1.0
        if r > 1.0 - _LEAF_PROBABILITY:
            digit = int(uniform() * 10)
            tokens.append(DIGIT_OFFSET + digit)
            if len(tokens) >= max_length:
                raise _TooLong
            return digit
        num_children = 2 + int(uniform() * (max_args - 1))
        op = int(uniform() * len(OPERATORS))
        tokens.append(OP_OFFSET + op)
        # The closing bracket is already owed: count it now so we abort earlier.
        if len(tokens) + 1 >= max_length:
            raise _TooLong
        values = [grow(depth + 1) for _ in range(num_children)]
        tokens.append(CLOSE_ID)
        return _apply(op, values)

    try:
        value = grow(1)
    except _TooLong:
        return None
    if not cfg.min_length < len(tokens) < cfg.max_length:
        return None
    return tokens, value


def _generate_chunk(args: tuple[ListOpsConfig, int, int]) -> list[tuple[bytes, int]]:
    """``count`` accepted trees from chunk ``index``, as (uint8 token bytes, value)."""
    cfg, index, count = args
    rand = random.Random(builders.derive_seed(cfg.seed, "listops", index))
    out = []
    while len(out) < count:
        tree = sample_tree(rand, cfg)
        if tree is not None:
            out.append((np.asarray(tree[0], np.uint8).tobytes(), tree[1]))
    return out


def generate(cfg: ListOpsConfig, num_workers: int | None = None) -> dict[str, list[dict]]:
    """All splits of a ListOps config, deduplicated across splits.

    Chunks of ``_CHUNK`` trees are seeded independently and concatenated in
    chunk order, then duplicates are dropped keeping the first occurrence, so
    the result does not depend on ``num_workers``.

    Returns:
      split name -> list of {'tokens': int32 [n], 'label': int} examples.
    """
    cfg.validate()
    total = sum(cfg.split_sizes().values())
    seen: set[bytes] = set()
    unique: list[tuple[bytes, int]] = []
    next_chunk = 0
    with builders.worker_pool(num_workers) as pool:
        while len(unique) < total:
            # Ask for what is missing plus a little slack for duplicates.
            missing = total - len(unique)
            n_chunks = -(-(missing + missing // 50 + 1) // _CHUNK)
            jobs = [(cfg, next_chunk + i, _CHUNK) for i in range(n_chunks)]
            next_chunk += n_chunks
            for chunk in pool(_generate_chunk, jobs):
                for key, value in chunk:
                    if key not in seen and len(unique) < total:
                        seen.add(key)
                        unique.append((key, value))
    out, start = {}, 0
    for split, size in cfg.split_sizes().items():
        out[split] = [
            {"tokens": np.frombuffer(k, np.uint8).astype(np.int32), "label": v}
            for k, v in unique[start : start + size]
        ]
        start += size
    return out


def to_lra_text(tokens: np.ndarray | list[int]) -> str:
    """The LRA serialiser's text for a token sequence, parentheses included.

    LRA builds a left-nested binary tree ``((((op, a), b), c), ']')`` and writes
    every pair as ``( x y )``; this reproduces that text from our pre-order ids.
    """
    ids = [int(t) for t in tokens]
    pos = 0

    def node() -> str:
        nonlocal pos
        tok = ids[pos]
        pos += 1
        if tok < OP_OFFSET:
            return ID_TO_TOKEN[tok]
        text = ID_TO_TOKEN[tok]
        while ids[pos] != CLOSE_ID:
            text = f"( {text} {node()} )"
        pos += 1
        return f"( {text} ] )"

    text = node()
    if pos != len(ids):
        raise ValueError(f"trailing tokens after a complete tree: {pos} of {len(ids)} used")
    return text


def tokenize_lra_text(text: str) -> np.ndarray:
    """Token ids of LRA text: drop the serialiser's parentheses, keep ``]``, split on spaces."""
    words = [w for w in text.split() if w not in ("(", ")")]
    try:
        return np.asarray([TOKEN_TO_ID[w] for w in words], np.int32)
    except KeyError as err:
        raise ValueError(f"unknown ListOps token {err.args[0]!r}") from None


class Listops(builders.SyntheticTaskBuilder):
    """ListOps (LRA) as a TFDS builder; examples are {'tokens': int32 [n], 'label': int}."""

    name = "listops"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "LRA ListOps generator, `]` kept as a token, duplicates removed."}
    BUILDER_CONFIGS = [
        ListOpsConfig(name="lra", description="LRA defaults: lengths 500-2000, 96k/2k/2k.",
                      num_train=96_000, num_validation=2_000, num_test=2_000),
        ListOpsConfig(name="short", description="Lengths 100-256 for 2-core CPU runs.",
                      min_length=100, max_length=256,
                      num_train=20_000, num_validation=1_000, num_test=1_000),
        ListOpsConfig(name="tiny", description="Lengths 16-64, a few hundred examples (tests).",
                      min_length=16, max_length=64, num_train=300, num_validation=50, num_test=50),
    ]

    def _task_features(self) -> dict:
        return {
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }

    def _make_splits(self) -> dict[str, list[dict]]:
        return generate(self.builder_config)

