"""Tests of globalattn.data: generators against their specs, TFDS round trip, grain pipeline."""
from __future__ import annotations

import dataclasses
import random
import re

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st

from globalattn import data
from globalattn.data import charlm, listops, mqar, retrieval, span_qa

tfds.disable_progress_bar()

# The generated tasks (``jsonl`` reads a directory instead: tests/test_jsonl_data.py).
TINY = {name: "tiny" for name, cls in data.BUILDERS.items() if cls.BUILDER_CONFIGS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One data dir with every task's tiny config prepared (shared: preparation is the slow part)."""
    path = str(tmp_path_factory.mktemp("tfds"))
    for name, config in TINY.items():
        data.prepare(name, config, path)
    return path


# ----------------------------------------------------------------------------- ListOps


def evaluate_listops(tokens: np.ndarray) -> tuple[int, int, list[int]]:
    """Independent evaluator: (value, max node depth, children counts) of pre-order ids."""
    ops = {12: min, 13: max, 14: lambda v: int(np.median(v)), 15: lambda v: sum(v) % 10}
    stack: list[list[int]] = []
    max_depth, arities = 0, []
    for i, tok in enumerate(int(t) for t in tokens):
        max_depth = max(max_depth, len(stack) + 1)
        if tok in ops:
            stack.append([tok])
        elif tok == 16:
            op, *values = stack.pop()
            arities.append(len(values))
            value = ops[op](values)
            if not stack:
                assert i == len(tokens) - 1, "tokens after the root closed"
                return value, max_depth, arities
            stack[-1].append(value)
        else:
            assert 2 <= tok <= 11, tok
            if not stack:
                assert len(tokens) == 1
                return tok - 2, 1, arities
            stack[-1].append(tok - 2)
    raise AssertionError("unterminated tree")


def parse_lra_text(text: str) -> object:
    """Parses LRA's parenthesised text into nested tuples (independently of the module)."""
    words = text.split()
    pos = 0

    def node() -> object:
        nonlocal pos
        word = words[pos]
        pos += 1
        if word != "(":
            return word
        left, right = node(), node()
        assert words[pos] == ")"
        pos += 1
        return (left, right)

    tree = node()
    assert pos == len(words)
    return tree


def count_atoms(tree: object) -> int:
    return 1 if isinstance(tree, str) else sum(count_atoms(t) for t in tree)


SMALL_LISTOPS = listops.ListOpsConfig(
    name="t", min_length=16, max_length=64, max_depth=4, max_args=5,
    num_train=400, num_validation=50, num_test=50,
)


@pytest.fixture(scope="module")
def listops_splits() -> dict[str, list[dict]]:
    return listops.generate(SMALL_LISTOPS, num_workers=1)


def test_listops_matches_spec(listops_splits):
    cfg = SMALL_LISTOPS
    examples = [ex for split in listops_splits.values() for ex in split]
    assert [len(s) for s in listops_splits.values()] == [400, 50, 50]
    labels = []
    for ex in examples:
        tokens = ex["tokens"]
        assert tokens.dtype == np.int32
        assert cfg.min_length < len(tokens) < cfg.max_length  # strict bounds
        assert set(np.unique(tokens)) <= set(range(2, 17))  # digits, 4 operators, ']'
        value, depth, arities = evaluate_listops(tokens)
        assert value == ex["label"]
        assert depth <= cfg.max_depth
        assert all(2 <= a <= cfg.max_args for a in arities)
        # Token count == tree length: LRA's text, parsed independently, has one
        # atom per token once its parentheses are dropped (and ']' is kept).
        text = listops.to_lra_text(tokens)
        assert count_atoms(parse_lra_text(text)) == len(tokens)
        np.testing.assert_array_equal(listops.tokenize_lra_text(text), tokens)
        labels.append(ex["label"])
    freq = np.bincount(labels, minlength=10) / len(labels)
    assert (freq > 0).sum() >= 8 and freq.max() < 0.35, freq
    keys = [ex["tokens"].tobytes() for ex in examples]
    assert len(set(keys)) == len(keys), "duplicates across splits"


def test_listops_operators_and_lra_bounds():
    rand = random.Random(0)
    lra = data.resolve_config("listops", "lra")
    trees = [t for t in (listops.sample_tree(rand, lra) for _ in range(600)) if t is not None]
    assert 20 <= len(trees) <= 90  # acceptance ~8% for 500-2000
    for tokens, value in trees:
        assert 500 < len(tokens) < 2000
        assert evaluate_listops(np.asarray(tokens))[0] == value
    ops_seen = {t for tokens, _ in trees for t in tokens if 12 <= t <= 15}
    assert ops_seen == {12, 13, 14, 15}
    # MED is the numpy median truncated: an even count averages the middle two.
    assert listops._apply(2, [1, 2, 5, 9]) == 3 and listops._apply(2, [0, 9]) == 4
    assert listops._apply(3, [9, 9, 5]) == 3


def test_listops_lra_bug_is_not_reproduced():
    a = np.array([13, 3, 12, 4, 5, 16, 6, 16])  # [MAX 1 [MIN 2 3 ] 4 ] = 4
    b = np.array([13, 3, 12, 4, 5, 6, 16, 16])  # [MAX 1 [MIN 2 3 4 ] ] = 2
    # LRA's public tokenizer keeps only alphanumerics: both trees become the same sequence.
    lra_tokens = lambda t: [w for w in re.sub(r"[^A-Za-z0-9 ]", "", listops.to_lra_text(t)).split()]
    assert lra_tokens(a) == lra_tokens(b)
    assert evaluate_listops(a)[0] != evaluate_listops(b)[0]
    for tree in (a, b):  # ours keeps ']' and round-trips
        np.testing.assert_array_equal(listops.tokenize_lra_text(listops.to_lra_text(tree)), tree)


def test_listops_deterministic_and_worker_independent(listops_splits, monkeypatch):
    again = listops.generate(SMALL_LISTOPS, num_workers=1)
    for split in listops_splits:
        for x, y in zip(listops_splits[split], again[split]):
            np.testing.assert_array_equal(x["tokens"], y["tokens"])
    other = listops.generate(dataclasses.replace(SMALL_LISTOPS, seed=1), num_workers=1)
    assert not np.array_equal(other["test"][0]["tokens"], again["test"][0]["tokens"])
    # Small chunks force the spawned worker pool; the result must not change.
    monkeypatch.setattr(listops, "_CHUNK", 16)
    serial = listops.generate(SMALL_LISTOPS, num_workers=1)
    parallel = listops.generate(SMALL_LISTOPS, num_workers=2)
    for split in serial:
        assert [e["tokens"].tobytes() for e in serial[split]] == [
            e["tokens"].tobytes() for e in parallel[split]]


# ----------------------------------------------------------------------------- MQAR


@pytest.mark.parametrize("overrides", [{}, {"num_queries": 2}, {"num_pairs": 8, "seq_len": 40}])
def test_mqar_layout(overrides):
    cfg = data.resolve_config("mqar", {"base": "tiny", **overrides})
    v, t, k, q = cfg.vocab_size, cfg.seq_len, cfg.num_pairs, cfg.queries
    examples = mqar.generate_split(cfg, "train", 200)
    offsets = []
    for ex in examples:
        tokens, labels, mask = ex["tokens"], ex["labels"], ex["label_mask"]
        assert tokens.shape == labels.shape == mask.shape == (t,)
        keys, values = tokens[0 : 2 * k : 2], tokens[1 : 2 * k : 2]
        assert ((1 <= keys) & (keys < v // 2)).all() and len(set(keys)) == k
        assert ((v // 2 <= values) & (values < v)).all()
        assert ((1 <= tokens) & (tokens < v)).all()
        pos = np.flatnonzero(mask)
        assert len(pos) == q and pos.min() >= 2 * k
        pairs = dict(zip(keys.tolist(), values.tolist()))
        assert len({int(tokens[p]) for p in pos}) == q  # each key queried at most once
        for p in pos:
            assert labels[p] == pairs[int(tokens[p])]
        assert (labels[~mask] == 0).all()
        offsets += (pos - 2 * k).tolist()
    # Power law with a small exponent: queries crowd near the key-value block.
    assert np.median(offsets) < (t - 2 * k) / 3


def test_mqar_rejects_impossible_configs():
    with pytest.raises(ValueError, match="num_pairs"):
        data.resolve_config("mqar", {"base": "tiny", "num_pairs": 40})
    with pytest.raises(ValueError, match="seq_len"):
        data.resolve_config("mqar", {"base": "tiny", "num_pairs": 12, "seq_len": 30})


# ----------------------------------------------------------------------------- retrieval


@pytest.mark.parametrize("config", ["t64", "t64_distract", "tiny"])
def test_retrieval_guarantee(config):
    cfg = data.resolve_config("long_range_retrieval", config)
    d = cfg.min_distance
    fillers = set(range(retrieval.VALUE_OFFSET + cfg.num_classes, cfg.vocab_size))
    examples = retrieval.generate_split(cfg, "train", 300)
    for ex in examples:
        tokens = ex["tokens"]
        assert tokens.shape == (cfg.seq_len,) and tokens[0] == retrieval.CLS_ID
        (m,) = np.flatnonzero(tokens == retrieval.MARKER_ID)
        assert m >= d and tokens[m + 1] == retrieval.VALUE_OFFSET + ex["label"]
        # Everything the readout can see through a window of reach < d is
        # CLS + label-independent filler: the window-only model is at chance.
        assert set(tokens[1:d].tolist()) <= fillers
        values = (tokens >= retrieval.VALUE_OFFSET) & (tokens < retrieval.VALUE_OFFSET + cfg.num_classes)
        assert values.sum() == 1 + cfg.num_distractors
    labels = np.bincount([ex["label"] for ex in examples], minlength=cfg.num_classes)
    assert labels.min() > 0
    # REFERENCE setting: 2 layers, radius 4 on 64 tokens is provably at chance.
    assert data.window_cannot_solve(2, 4, cfg)
    assert data.window_cannot_solve(1, d - 1, cfg) and not data.window_cannot_solve(1, d, cfg)


# ----------------------------------------------------------------------------- span QA


@pytest.mark.parametrize("config", ["r32", "tiny"])
def test_span_labels_point_at_answer(config):
    cfg = data.resolve_config("span_qa", config)
    kl = cfg.key_length
    value0 = span_qa.KEY_OFFSET + cfg.num_keys
    for ex in span_qa.generate_split(cfg, "test", 200):
        tokens, seg, s, e = ex["tokens"], ex["segment_ids"], ex["start"], ex["end"]
        assert len(tokens) <= cfg.max_length
        assert tokens[0] == span_qa.CLS_ID and tokens[kl + 1] == span_qa.SEP_ID
        assert (seg[: kl + 2] == 0).all() and (seg[kl + 2 :] == 1).all()
        question = tokens[1 : kl + 1]
        assert kl + 2 + kl <= s <= e < len(tokens)
        np.testing.assert_array_equal(tokens[s - kl : s], question)
        assert (tokens[s : e + 1] >= value0).all()
        assert e + 1 == len(tokens) or tokens[e + 1] < value0  # the value ends at e
        context = tokens[kl + 2 :]
        hits = [i for i in range(len(context) - kl + 1) if (context[i : i + kl] == question).all()]
        assert len(hits) == 1


# ----------------------------------------------------------------------------- TFDS + grain


def test_prepare_and_read_back(data_dir):
    for name in TINY:
        meta = data.task_metadata(name, "tiny")
        # Read back through the public TFDS entry point, without TensorFlow.
        source = tfds.data_source(f"{name}/tiny", split="validation", data_dir=data_dir, download=False)
        n_val = data.resolve_config(name, "tiny").split_sizes()["validation"]
        assert len(source) == n_val
        builder = data.get_builder(name, "tiny", data_dir)
        stored = sorted(bytes(np.asarray(source[i]["tokens"], np.int32)) for i in range(len(source)))
        fresh = builder._make_splits()["validation"]
        assert stored == sorted(bytes(np.asarray(ex["tokens"], np.int32)) for ex in fresh)
        assert builder.info.metadata["task"]["vocab_size"] == meta.vocab_size

        it = data.make_iterator(name, "validation", 16, seed=3, config="tiny", data_dir=data_dir,
                                num_epochs=1, shuffle=False, shard_options=grain.sharding.NoSharding())
        batches = list(it)
        assert len(batches) == n_val // 16
        for b in batches:
            t = meta.max_length
            assert b["tokens"].shape == (16, t) and b["tokens"].dtype == np.int32
            assert b["padding_mask"].dtype == bool and b["segment_ids"].dtype == np.int32
            assert (b["tokens"][~b["padding_mask"]] == 0).all()
            assert (b["tokens"][b["padding_mask"]] != 0).all()
            assert (b["tokens"] < meta.vocab_size).all()
            if meta.kind == "classification":
                assert b["label"].shape == (16,) and b["label"].dtype == np.int32
                assert (b["label"] < meta.num_classes).all()
            elif meta.kind == "token":
                assert b["labels"].shape == (16, t) and b["label_mask"].dtype == bool
            else:
                assert b["start"].dtype == b["end"].dtype == np.int32
                rows = np.arange(16)
                assert b["padding_mask"][rows, b["end"]].all() and (b["start"] <= b["end"]).all()
                assert (b["segment_ids"][rows, b["start"]] == 1).all()


def test_prepare_is_deterministic(tmp_path, data_dir):
    data.prepare("mqar", "tiny", str(tmp_path))
    a = tfds.data_source("mqar/tiny", split="train", data_dir=str(tmp_path), download=False)
    b = tfds.data_source("mqar/tiny", split="train", data_dir=data_dir, download=False)
    for i in range(0, len(a), 37):
        for key in ("tokens", "labels", "label_mask"):
            np.testing.assert_array_equal(a[i][key], b[i][key])


def test_iterator_state_restores_the_same_batches(data_dir):
    kwargs = dict(config="tiny", data_dir=data_dir, shard_options=grain.sharding.NoSharding())
    it = data.make_iterator("listops", "train", 64, seed=7, **kwargs)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses the epoch boundary (300 records)
    resumed = data.make_iterator("listops", "train", 64, seed=7, **kwargs)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    same = next(data.make_iterator("listops", "train", 64, seed=7, **kwargs))
    other = next(data.make_iterator("listops", "train", 64, seed=8, **kwargs))
    first = next(data.make_iterator("listops", "train", 64, seed=7, **kwargs))
    np.testing.assert_array_equal(same["tokens"], first["tokens"])
    assert not np.array_equal(same["tokens"], other["tokens"])


def test_sharding_splits_records_between_processes(data_dir):
    seen = []
    for index in range(2):
        opts = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        it = data.make_iterator("long_range_retrieval", "test", 5, seed=0, config="tiny",
                                data_dir=data_dir, shard_options=opts, num_epochs=1)
        seen.append({row.tobytes() for b in it for row in b["tokens"]})
    assert len(seen[0]) == len(seen[1]) == 25 and not seen[0] & seen[1]


def test_over_long_example_is_an_error(data_dir):
    it = data.make_iterator("listops", "train", 8, seed=0, config="tiny", data_dir=data_dir, pad_to=20,
                            shard_options=grain.sharding.NoSharding())
    with pytest.raises(ValueError, match=r"example has \d+ tokens but the padded length is 20"):
        for _ in range(40):
            next(it)


def test_prepend_cls_shifts_labels(data_dir):
    kw = dict(config="tiny", data_dir=data_dir, shuffle=False, num_epochs=1,
              shard_options=grain.sharding.NoSharding())
    plain = next(data.make_iterator("span_qa", "test", 8, **kw))
    cls = next(data.make_iterator("span_qa", "test", 8, prepend_cls=True, **kw))
    t = data.task_metadata("span_qa", "tiny").max_length
    assert cls["tokens"].shape == (8, t + 1) and (cls["tokens"][:, 0] == span_qa.CLS_ID).all()
    np.testing.assert_array_equal(cls["tokens"][:, 1:], plain["tokens"])
    np.testing.assert_array_equal(cls["start"], plain["start"] + 1)
    with pytest.raises(ValueError, match="no CLS"):
        data.make_loader("mqar", "test", 8, prepend_cls=True, config="tiny", data_dir=data_dir)


@given(n=st.integers(0, 12), length=st.integers(1, 12), cls=st.booleans())
def test_format_example_pads_tokens_and_masks(n, length, cls):
    fmt = data.FormatExample("token", length, 1 if cls else None)
    ex = {"tokens": np.arange(2, 2 + n), "labels": np.arange(n), "label_mask": np.ones(n, bool)}
    if n + cls > length:
        with pytest.raises(ValueError, match=f"{n + cls} tokens"):
            fmt.map(ex)
        return
    out = fmt.map(ex)
    assert out["padding_mask"].sum() == n + cls and out["tokens"].shape == (length,)
    assert out["label_mask"].sum() == n and not out["label_mask"][:cls].any()
    np.testing.assert_array_equal(out["labels"][cls : cls + n], np.arange(n))


def test_config_resolution_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        data.resolve_config("nope")
    with pytest.raises(ValueError, match="no config"):
        data.resolve_config("listops", "huge")
    with pytest.raises(ValueError, match="unknown 'listops' parameters"):
        data.resolve_config("listops", {"max_len": 3})
    a = data.resolve_config("listops", {"base": "tiny", "seed": 1})
    b = data.resolve_config("listops", {"base": "tiny", "seed": 2})
    assert a.name != b.name and a.name.startswith("tiny_")
    data.prepare("long_range_retrieval", {"base": "tiny", "name": "mine", "num_train": 10},
                 str(tmp_path))
    with pytest.raises(ValueError, match="differs from the requested"):
        data.get_builder("long_range_retrieval", {"base": "tiny", "name": "mine", "num_train": 20},
                         str(tmp_path))


def test_byte_text_loader_offline():
    records = [{"text": f"review {i} " * (i % 5 + 1), "label": i % 2} for i in range(40)]
    loader = data.make_text_loader("imdb_reviews", "train", 4, seed=0, max_length=64, source=records,
                                   shuffle=False, num_epochs=1, shard_options=grain.sharding.NoSharding())
    batch = next(iter(loader))
    text = records[0]["text"].encode()
    np.testing.assert_array_equal(batch["tokens"][0, : len(text)], np.frombuffer(text, np.uint8) + 2)
    assert batch["padding_mask"][0].sum() == len(text) and batch["label"].tolist() == [0, 1, 0, 1]
    long = [{"text": "x" * 100, "label": 0}]
    with pytest.raises(ValueError, match="100 bytes > max_length 64"):
        next(iter(data.make_text_loader("x", "train", 1, source=long, max_length=64,
                                        shard_options=grain.sharding.NoSharding())))
    cut = next(iter(data.make_text_loader("x", "train", 1, source=long, max_length=64, truncate=True,
                                          shard_options=grain.sharding.NoSharding())))
    assert cut["padding_mask"].all()


def test_metadata_is_consistent():
    for name, cls in data.BUILDERS.items():
        for cfg in cls.BUILDER_CONFIGS:
            meta = data.task_metadata(name, cfg.name)
            assert meta.pad_id == 0 and meta.max_length > 0 and meta.vocab_size > 1
            assert meta.kind in ("classification", "token", "span")
    assert data.task_metadata("listops").num_classes == 10
    assert data.task_metadata("listops").max_length == 2000
    for name in TINY:
        names = [c.name for c in data.BUILDERS[name].BUILDER_CONFIGS]
        assert len(set(names)) == len(names) and "tiny" in names
    assert data.resolve_config("mqar", {"base": "tiny"}) is data.resolve_config("mqar", "tiny")


# ----------------------------------------------------------------------------- charlm


def test_charlm_text_and_batches(data_dir):
    assert charlm.decode(charlm.encode("def f(x):\n\treturn 'é'")) == \
        "def f(x):\n\treturn '\ufffd\ufffd'"  # UTF-8 'é' is two non-ASCII bytes
    cfg = data.resolve_config("charlm", "tiny")
    text = charlm.split_text("test", "tiny", data_dir)
    assert text.shape == (cfg.num_test * cfg.seq_len + 1,)
    np.testing.assert_array_equal(text, charlm.split_ids(cfg, "test"))  # contiguous, in order
    assert text.min() >= 1 and text.max() < charlm.VOCAB_SIZE
    batch = next(iter(data.make_loader("charlm", "train", 4, config="tiny", data_dir=data_dir)))
    assert batch["tokens"].shape == batch["labels"].shape == (4, cfg.seq_len)
    np.testing.assert_array_equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    assert batch["label_mask"].all() and batch["padding_mask"].all()
    files = charlm.corpus_files(cfg.resolved_source_dir())
    splits = {charlm.split_of(f) for f in files}
    assert splits == {"train", "validation", "test"}
    assert not any("/test/" in f"/{f}" for f in files)


def test_charlm_refuses_bad_configs():
    with pytest.raises(ValueError, match="this is Python"):
        data.resolve_config("charlm", {"base": "tiny", "python_version": "2.7"})
    with pytest.raises(ValueError, match="fewer than"):
        charlm.split_ids(data.resolve_config("charlm", {"base": "tiny", "num_test": 10**7}),
                         "test")
    with pytest.raises(ValueError, match="unknown 'charlm' parameters"):
        data.resolve_config("charlm", {"base": "tiny", "seqlen": 3})
