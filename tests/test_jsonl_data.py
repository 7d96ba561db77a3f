"""The ``jsonl`` task: pre-tokenised local JSON Lines directories, strictly validated.

Batches must equal what the lines say; every malformed line or metadata field
is a ValueError naming the file, the line and the value; the fine-tuning
configs' ``:jsonl`` variants validate against a directory, and (slow) train a
few steps of each ``finetune_*:test`` config pointed at a tiny directory.
"""
from __future__ import annotations

import json
import os
import re

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from globalattn import data
from globalattn.train.config import apply_overrides, load_config, validate_config
from globalattn.train.loop import train_and_evaluate

tfds.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "hf_golden")

CLS_META = {"kind": "classification", "vocab_size": 64, "max_length": 8, "num_classes": 3}
SPAN_META = {"kind": "span", "vocab_size": 64, "max_length": 12, "max_question_length": 4,
             "cls_id": 0}


def classification_lines(n: int, seed: int, meta=CLS_META) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, meta["vocab_size"],
                                    rng.integers(1, meta["max_length"] + 1)).tolist(),
             "label": int(rng.integers(meta["num_classes"]))} for _ in range(n)]


def span_lines(n: int, seed: int, meta=SPAN_META, max_length: int | None = None) -> list[dict]:
    """``<s> question </s> context``-like lines: segment 0 then 1, an answer in the context."""
    rng = np.random.default_rng(seed)
    max_length = max_length or meta["max_length"]
    out = []
    for i in range(n):
        q = int(rng.integers(1, meta["max_question_length"] + 1))
        c = int(rng.integers(1, max_length - q + 1))
        start = q + int(rng.integers(c))
        end = start + int(rng.integers(q + c - start))
        out.append({"tokens": rng.integers(0, meta["vocab_size"], q + c).tolist(),
                    "segment_ids": [0] * q + [1] * c, "start": start, "end": end,
                    "id": f"q{i}"})
    return out


def write_dir(path, meta: dict | str, splits: dict[str, list]) -> str:
    """A JSONL directory: ``metadata.json`` (a dict, or raw text) and one file per split
    (each line a dict, or raw text written as is)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metadata.json"), "w") as f:
        f.write(meta if isinstance(meta, str) else json.dumps(meta))
    for split, lines in splits.items():
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for line in lines:
                f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def read_all(source_dir: str, split: str, data_dir: str, batch_size: int, **kwargs) -> dict:
    """One unshuffled pass over a split, batches concatenated."""
    loader = data.make_loader("jsonl", split, batch_size, config=source_dir, data_dir=data_dir,
                              shuffle=False, num_epochs=1, drop_remainder=False,
                              shard_options=grain.sharding.NoSharding(), **kwargs)
    batches = list(loader)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ----------------------------------------------------------------------------- batches


def test_classification_batches_equal_the_lines(tmp_path):
    splits = {"train": classification_lines(13, 0), "validation": classification_lines(7, 1),
              "test": classification_lines(5, 2)}
    src = write_dir(tmp_path / "imdb", CLS_META, splits)
    cfg = data.resolve_config("jsonl", src)
    assert cfg.split_sizes() == {"train": 13, "validation": 7, "test": 5}
    assert data.task_metadata("jsonl", src) == data.TaskMetadata(
        kind="classification", vocab_size=64, num_classes=3, max_length=8, pad_id=0, cls_id=None)
    tfds_dir = str(tmp_path / "tfds")
    for split, lines in splits.items():
        b = read_all(src, split, tfds_dir, 4)  # partial last batch: nothing dropped
        assert b["tokens"].shape == (len(lines), 8) and b["tokens"].dtype == np.int32
        for i, line in enumerate(lines):  # stored in file order
            n = len(line["tokens"])
            np.testing.assert_array_equal(b["tokens"][i], line["tokens"] + [0] * (8 - n))
            np.testing.assert_array_equal(b["padding_mask"][i], np.arange(8) < n)
            assert b["label"][i] == line["label"]
        assert not b["segment_ids"].any()
    # Shuffled training batches: one epoch is every line once.
    it = data.make_iterator("jsonl", "train", 13, seed=5, config=src, data_dir=tfds_dir,
                            num_epochs=1, shard_options=grain.sharding.NoSharding())
    (batch,) = list(it)
    got = sorted((tuple(t[m]), int(y)) for t, m, y in zip(batch["tokens"], batch["padding_mask"],
                                                            batch["label"]))
    assert got == sorted((tuple(x["tokens"]), x["label"]) for x in splits["train"])


@pytest.mark.parametrize("prepend_cls", [False, True])
def test_span_batches_equal_the_lines(tmp_path, prepend_cls):
    splits = {"train": span_lines(9, 0), "validation": span_lines(6, 1)}  # no test.jsonl
    src = write_dir(tmp_path / "triviaqa", SPAN_META, splits)
    cfg = data.resolve_config("jsonl", src)
    assert cfg.split_sizes() == {"train": 9, "validation": 6}
    assert cfg.max_question_length == 4 and cfg.metadata().num_classes is None
    tfds_dir = str(tmp_path / "tfds")
    shift = int(prepend_cls)
    T = 12 + shift
    for split, lines in splits.items():
        b = read_all(src, split, tfds_dir, 4, prepend_cls=prepend_cls)
        assert b["tokens"].shape == (len(lines), T)
        for i, line in enumerate(lines):
            n = len(line["tokens"])
            want = [0] * shift + line["tokens"] + [0] * (T - n - shift)  # cls_id is 0
            np.testing.assert_array_equal(b["tokens"][i], want)
            np.testing.assert_array_equal(b["padding_mask"][i], np.arange(T) < n + shift)
            seg = [0] * shift + line["segment_ids"] + [0] * (T - n - shift)
            np.testing.assert_array_equal(b["segment_ids"][i], seg)
            assert (b["start"][i], b["end"][i]) == (line["start"] + shift, line["end"] + shift)
    with pytest.raises(ValueError, match=r"Unknown split 'test'"):
        data.data_source("jsonl", "test", src, tfds_dir)


def test_resolve_reads_each_file_once_and_names_by_content(tmp_path):
    lines = {"train": classification_lines(5, 0), "validation": classification_lines(3, 1)}
    a = write_dir(tmp_path / "a", CLS_META, lines)
    b = write_dir(tmp_path / "copy" / "a", CLS_META, lines)  # the same files elsewhere
    ca, cb = data.resolve_config("jsonl", a), data.resolve_config("jsonl", b)
    assert ca.name == cb.name and ca.name.startswith("a_") and ca.params() == cb.params()
    assert ca.source_dir == os.path.abspath(a) != cb.source_dir
    tfds_dir = str(tmp_path / "tfds")
    data.prepare("jsonl", a, tfds_dir)
    assert data.get_builder("jsonl", b, tfds_dir).is_prepared()  # a pod host's own copy
    # An edit (even one that keeps the line count) is a new data set, converted anew.
    edited = [dict(x, label=(x["label"] + 1) % 3) for x in lines["train"]]
    write_dir(tmp_path / "a", CLS_META, {"train": edited})
    cc = data.resolve_config("jsonl", a)
    assert cc.name != ca.name and cc.split_sizes() == ca.split_sizes()
    assert not data.get_builder("jsonl", a, tfds_dir).is_prepared()
    got = read_all(a, "train", tfds_dir, 5)["label"]
    np.testing.assert_array_equal(got, [x["label"] for x in edited])


# ----------------------------------------------------------------------------- errors

_TOO_LONG = {"tokens": list(range(9)), "label": 0}
CLASSIFICATION_ERRORS = [
    (_TOO_LONG, r"9 tokens > max_length=8 \(metadata.json\)"),
    ({"tokens": [1, 2], "label": 3}, r"'label' = 3 is not an int in \[0, num_classes=3\)"),
    ({"tokens": [1, 2], "label": -1}, r"'label' = -1 "),
    ({"tokens": [1, 2], "label": "1"}, r"'label' = '1' is not an int"),
    ({"tokens": [1, 2], "label": 1.0}, r"'label' = 1.0 is not an int"),
    ({"tokens": [1, 2], "label": True}, r"'label' = True is not an int"),
    ({"tokens": [1, 2.0], "label": 0}, r"'tokens'\[1\] = 2.0 is not an int"),
    ({"tokens": [1, False], "label": 0}, r"'tokens'\[1\] = False is not an int"),
    ({"tokens": [1, 2, 64], "label": 0}, r"'tokens'\[2\] = 64 is outside \[0, 64\)"),
    ({"tokens": [-5, 1], "label": 0}, r"'tokens'\[0\] = -5 is outside \[0, 64\)"),
    ({"tokens": [2**70], "label": 0}, r"'tokens'\[0\] = 1180591620717411303424 is outside"),
    ({"tokens": [], "label": 0}, r"'tokens' is empty"),
    ({"tokens": "1 2 3", "label": 0}, r"'tokens' must be a list of ints, got str"),
    ({"tokens": [1, 2]}, r"missing fields \['label'\]"),
    ({"tokens": [1, 2], "label": 0, "lable": 1}, r"unknown fields \['lable'\]"),
    ({"tokens": [1], "label": 0, "segment_ids": [0]}, r"unknown fields \['segment_ids'\]"),
    ('{"tokens": [1, 2], "label": 0', r"not valid JSON"),
    ("", r"empty line"),
    ("[1, 2]", r"must be a JSON object, got list"),
]


@pytest.mark.parametrize("bad,message", CLASSIFICATION_ERRORS,
                         ids=[str(i) for i in range(len(CLASSIFICATION_ERRORS))])
def test_classification_line_errors_name_file_line_and_value(tmp_path, bad, message):
    lines = classification_lines(4, 0)
    lines.insert(2, bad)  # line 3
    src = write_dir(tmp_path / "d", CLS_META,
                    {"train": lines, "validation": classification_lines(2, 1)})
    where = re.escape(os.path.join(os.path.abspath(src), "train.jsonl") + ":3: ")
    with pytest.raises(ValueError, match=where + ".*" + message):
        data.prepare("jsonl", src, str(tmp_path / "tfds"))


_OK_SPAN = {"tokens": [0, 5, 2, 7, 8, 9], "segment_ids": [0, 0, 0, 1, 1, 1], "start": 3, "end": 4}
SPAN_ERRORS = [
    (dict(_OK_SPAN, start=4, end=3), r"span start=4, end=3 is not within the 6 tokens"),
    (dict(_OK_SPAN, end=6), r"span start=3, end=6 is not within the 6 tokens"),
    (dict(_OK_SPAN, start=-1), r"span start=-1, end=4"),
    (dict(_OK_SPAN, start="3"), r"'start' = '3' is not an int"),
    (dict(_OK_SPAN, end=4.0), r"'end' = 4.0 is not an int"),
    (dict(_OK_SPAN, segment_ids=[0, 0, 1]), r"'segment_ids' has 3 entries but 'tokens' has 6"),
    (dict(_OK_SPAN, segment_ids=[0, 0, 0, 1, 2, 1]), r"'segment_ids'\[4\] = 2 is outside \[0, 2\)"),
    (dict(_OK_SPAN, tokens=[0] * 6, segment_ids=[0] * 5 + [1]),
     r"5 question tokens \(segment_ids == 0\) > max_question_length=4 \(metadata.json\)"),
    (dict(_OK_SPAN, tokens=[0] * 13, segment_ids=[0] * 3 + [1] * 10),
     r"13 tokens > max_length=12"),
    ({k: v for k, v in _OK_SPAN.items() if k != "segment_ids"}, r"missing fields \['segment_ids'\]"),
    (dict(_OK_SPAN, label=1), r"unknown fields \['label'\]"),
]


@pytest.mark.parametrize("bad,message", SPAN_ERRORS, ids=[str(i) for i in range(len(SPAN_ERRORS))])
def test_span_line_errors_name_file_line_and_value(tmp_path, bad, message):
    lines = span_lines(3, 0)
    src = write_dir(tmp_path / "d", SPAN_META,
                    {"train": span_lines(3, 2), "validation": lines[:1] + [bad] + lines[1:]})
    where = re.escape(os.path.join(os.path.abspath(src), "validation.jsonl") + ":2: ")
    with pytest.raises(ValueError, match=where + ".*" + message):
        data.prepare("jsonl", src, str(tmp_path / "tfds"))


def test_span_line_pointing_at_cls_is_allowed(tmp_path):
    """``start = end = 0`` (``<s>``) is the usual "no answer in this chunk" label."""
    no_answer = dict(_OK_SPAN, start=0, end=0)
    src = write_dir(tmp_path / "d", SPAN_META, {"train": [no_answer], "validation": [_OK_SPAN]})
    b = read_all(src, "train", str(tmp_path / "tfds"), 1)
    assert (b["start"][0], b["end"][0]) == (0, 0)


METADATA_ERRORS = [
    ({**CLS_META, "kind": "token"}, r"'kind' must be one of \['classification', 'span'\], got 'token'"),
    ({k: v for k, v in CLS_META.items() if k != "num_classes"},
     r"missing field 'num_classes' \(required for kind 'classification'\)"),
    ({k: v for k, v in SPAN_META.items() if k != "max_question_length"},
     r"missing field 'max_question_length' \(required for kind 'span'\)"),
    ({k: v for k, v in CLS_META.items() if k != "max_length"}, r"missing field 'max_length'"),
    ({**CLS_META, "vocab_size": "64"}, r"'vocab_size' must be an int >= 1, got '64'"),
    ({**CLS_META, "max_length": 0}, r"'max_length' must be an int >= 1, got 0"),
    ({**CLS_META, "num_classes": 1}, r"'num_classes' must be an int >= 2, got 1"),
    ({**CLS_META, "cls_id": 64}, r"'cls_id'=64 is outside the vocabulary \[0, 64\)"),
    ({**CLS_META, "pad_id": 1}, r"'pad_id' is not a field: batches are padded with 0"),
    ({**CLS_META, "max_len": 8}, r"unknown fields \['max_len'\]"),
    ({**CLS_META, "max_question_length": 3}, r"'max_question_length' is for kind 'span'"),
    ({**SPAN_META, "num_classes": 2}, r"'num_classes' is for kind 'classification'"),
    ({**SPAN_META, "max_question_length": 13}, r"'max_question_length'=13 > 'max_length'=12"),
    ("{kind: span}", r"not valid JSON"),
    ("[]", r"must be a JSON object, got list"),
]


@pytest.mark.parametrize("meta,message", METADATA_ERRORS,
                         ids=[str(i) for i in range(len(METADATA_ERRORS))])
def test_metadata_errors_name_the_file_and_value(tmp_path, meta, message):
    src = write_dir(tmp_path / "d", meta, {"train": [], "validation": []})
    where = re.escape(os.path.join(os.path.abspath(src), "metadata.json") + ":")
    with pytest.raises(ValueError, match=where + ".*" + message):
        data.resolve_config("jsonl", src)


def test_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="needs its directory as the config.*metadata.json"):
        data.resolve_config("jsonl", "")
    with pytest.raises(ValueError, match="needs its directory"):
        data.task_metadata("jsonl")
    with pytest.raises(ValueError, match=f"{tmp_path}/nowhere is not a directory"):
        data.resolve_config("jsonl", str(tmp_path / "nowhere"))
    src = write_dir(tmp_path / "d", CLS_META, {"train": classification_lines(2, 0)})
    with pytest.raises(ValueError, match=r"missing \['validation.jsonl'\]"):
        data.resolve_config("jsonl", src)
    write_dir(src, CLS_META, {"validation": [], "train": classification_lines(2, 0)})
    with pytest.raises(ValueError, match=r"validation.jsonl is empty"):
        data.resolve_config("jsonl", src)
    write_dir(src, CLS_META, {"validation": classification_lines(2, 0), "test": []})
    with pytest.raises(ValueError, match=r"test.jsonl is empty; remove it or fill it"):
        data.resolve_config("jsonl", src)


def test_a_file_changed_after_resolving_is_caught(tmp_path):
    src = write_dir(tmp_path / "d", CLS_META, {"train": classification_lines(4, 0),
                                               "validation": classification_lines(2, 1)})
    cfg = data.resolve_config("jsonl", src)
    write_dir(src, CLS_META, {"train": classification_lines(5, 0)})
    with pytest.raises(ValueError, match=r"train.jsonl: has 5 lines but 4 were counted"):
        data.prepare("jsonl", cfg, str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------- configs

FINETUNE = {  # config -> (tiny Hugging Face fixture, kind, metadata for its :test run)
    "finetune_longformer_qa": ("longformer_qa", "span",
                               {**SPAN_META, "max_length": 16, "max_question_length": 3}),
    "finetune_longformer_classify": ("longformer_cls", "classification",
                                     {**CLS_META, "max_length": 32}),
    "finetune_bigbird_classify": ("bigbird_cls", "classification", {**CLS_META, "max_length": 32}),
}


def _lines(kind: str, meta: dict, n: int, seed: int) -> list[dict]:
    return (span_lines(n, seed, meta) if kind == "span"
            else classification_lines(n, seed, meta))


def _config(name: str, arg: str, **overrides):
    return apply_overrides(load_config(os.path.join(ROOT, "configs", f"{name}.py:{arg}")),
                           overrides)


@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_jsonl_variant_validates_at_paper_scale(tmp_path, name):
    """``:jsonl`` + ``data.config=DIR`` of 4,096-token metadata is a valid 8-device run."""
    _, kind, _ = FINETUNE[name]
    meta = ({"kind": "span", "vocab_size": 50265, "max_length": 4096, "max_question_length": 64}
            if kind == "span" else
            {"kind": "classification", "vocab_size": 50358, "max_length": 4096, "num_classes": 2})
    src = write_dir(tmp_path / "d", meta, {"train": _lines(kind, meta, 3, 0),
                                           "validation": _lines(kind, meta, 2, 1)})
    spec = validate_config(_config(name, "jsonl", **{"data.config": src}), device_count=8,
                           process_count=1)
    assert spec.seq_len == 4096 and spec.meta.kind == kind
    assert spec.split_sizes == {"train": 3, "validation": 2}
    with pytest.raises(ValueError, match="data: task 'jsonl' needs its directory"):
        validate_config(_config(name, "jsonl"), device_count=8, process_count=1)
    with pytest.raises(ValueError, match=r"final_eval_splits \['test'\] not in the splits"):
        validate_config(_config(name, "jsonl", **{"data.config": src,
                                                  "data.final_eval_splits": ("validation", "test")}),
                        device_count=8, process_count=1)
    if kind == "span":  # more question tokens than global slots: refused before training
        with open(os.path.join(src, "metadata.json"), "w") as f:
            json.dump({**meta, "max_question_length": 65}, f)
        with pytest.raises(ValueError, match=r"num_globals=64 < question length 65 of jsonl/"):
            validate_config(_config(name, "jsonl", **{"data.config": src}), device_count=8,
                            process_count=1)
    else:  # a classification config on QA data: the head does not fit
        span_meta = {"kind": "span", "vocab_size": 64, "max_length": 64, "max_question_length": 4}
        qa = write_dir(tmp_path / "qa", span_meta, {"train": span_lines(2, 0, span_meta),
                                                    "validation": span_lines(2, 1, span_meta)})
        with pytest.raises(ValueError, match="model.head='classify' does not fit task 'jsonl' of "
                                             "kind 'span'"):
            validate_config(_config(name, "jsonl", **{"data.config": qa}), device_count=8,
                            process_count=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FINETUNE))
def test_finetune_config_trains_on_a_jsonl_dir(tmp_path, name):
    """``:test`` (the tiny Hugging Face checkpoint, loaded in memory) pointed at a tiny
    JSONL directory: 3 steps, then every validation (and test) line evaluated once."""
    _, kind, meta = FINETUNE[name]
    splits = {"train": _lines(kind, meta, 16, 0), "validation": _lines(kind, meta, 11, 1)}
    final = ("validation",)
    if kind == "classification":
        splits["test"] = _lines(kind, meta, 5, 2)
        final = ("validation", "test")
    src = write_dir(tmp_path / "d", meta, splits)
    config = _config(name, "test", **{"data.name": "jsonl", "data.config": src,
                                      "data.data_dir": str(tmp_path / "tfds"),
                                      "data.final_eval_splits": final})
    losses = []
    result = train_and_evaluate(config, str(tmp_path / "work"),
                                step_callback=lambda step, m: losses.append(float(m["loss"])))
    assert result["step"] == config.num_train_steps == len(losses) == 3
    assert np.all(np.isfinite(losses)), losses
    for split in final:
        assert result[f"{split}/num_examples"] == len(splits[split])
        assert np.isfinite(result[f"{split}/loss"])
