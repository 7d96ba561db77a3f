"""Live parity against PyTorch: tiny random Hugging Face models vs ``load_hf``.

Needs torch and transformers (skipped without them); slow, so it runs with
``-m slow``. For every case of ``tests/fixtures/make_hf_golden.py``
(LongformerModel, LongformerForSequenceClassification,
LongformerForQuestionAnswering, BigBirdModel in block_sparse mode with r = 1
and 2, BigBirdForSequenceClassification): build from a config, save with
``save_pretrained``, load with :func:`globalattn.models.load_hf`, and compare
hidden states and logits (f32, within 1e-5) on padded batches with
per-example global masks and lengths that are not a multiple of the window or
block; BigBird's random blocks are the same explicit indices on both sides.
"""
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_hf_golden as G  # noqa: E402

from globalattn.models import load_hf  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-5


def _ours(model, variables, inputs, rb, use_globals=True, qa_default=False, **over):
    ids = inputs["qa_input_ids"] if qa_default else inputs["input_ids"]
    kw = {"attention_mask": inputs["attention_mask"]}
    if use_globals and "global_attention_mask" in inputs:
        kw["global_attention_mask"] = inputs["global_attention_mask"]
    if rb is not None:
        kw["random_blocks"] = rb
    kw.update(over)
    return model.apply(variables, ids, **kw)


def _errors(ours, ref, mask):
    errs = {}
    for k, v in ref.items():
        got = np.asarray(ours[k])
        assert got.shape == v.shape, (k, got.shape, v.shape)
        assert np.all(np.isfinite(got)), k
        if k == "last_hidden_state":  # padded positions are outputs of neither model
            got, v = got[mask], v[mask]
        errs[k] = float(np.max(np.abs(got - v)))
    return errs


def _case(tmp_path, name, seed, seq_len=None):
    hf = G.build_hf(name, seed=seed)
    d = tmp_path / f"{name}_{seed}"
    hf.save_pretrained(str(d))
    inputs = G.make_inputs(name, seed=seed, seq_len=seq_len)
    rb = G.random_blocks_for(name, inputs["input_ids"].shape[1], seed=seed)
    if rb is not None:
        G.patch_random_blocks(hf, rb)
    return hf, d, inputs, rb


@pytest.mark.parametrize("name", sorted(G.CASES))
@pytest.mark.parametrize("seed", [11, 12])
def test_live_parity(tmp_path, name, seed):
    hf, d, inputs, rb = _case(tmp_path, name, seed)
    assert name.startswith("longformer") or rb is not None  # BigBird cases are block-sparse
    model, variables = load_hf(str(d))
    mask = inputs["attention_mask"].astype(bool)
    for run, kw in G.golden_runs(name):
        ref = G.torch_outputs(hf, inputs, **kw)
        errs = _errors(_ours(model, variables, inputs, rb, **kw), ref, mask)
        assert max(errs.values()) < TOL, (run, errs)


def test_live_bigbird_random_blocks_are_used(tmp_path):
    """The comparison can fail: other random blocks on our side give other outputs."""
    hf, d, inputs, rb = _case(tmp_path, "bigbird", 3)
    model, variables = load_hf(str(d))
    ref = G.torch_outputs(hf, inputs)
    other = np.asarray(G.random_blocks_for("bigbird", inputs["input_ids"].shape[1], seed=4))
    assert not np.array_equal(other, rb)
    errs = _errors(_ours(model, variables, inputs, other), ref,
                   inputs["attention_mask"].astype(bool))
    assert errs["last_hidden_state"] > 1e-3


@pytest.mark.parametrize("seq_len", [20, 28])
def test_live_bigbird_short_inputs_use_full_attention(tmp_path, seq_len):
    """At most (5 + 2r) * block_size tokens: both switch to full attention."""
    hf, d, inputs, rb = _case(tmp_path, "bigbird", 5, seq_len=seq_len)
    assert rb is None
    model, variables = load_hf(str(d))
    ref = G.torch_outputs(hf, inputs)
    errs = _errors(_ours(model, variables, inputs, None), ref,
                   inputs["attention_mask"].astype(bool))
    assert max(errs.values()) < TOL, errs


def test_live_pytorch_bin_checkpoint(tmp_path):
    """A checkpoint stored as pytorch_model.bin (older releases) loads through torch."""
    hf, d, inputs, _ = _case(tmp_path, "longformer_cls", 6)
    os.remove(d / "model.safetensors")
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    model, variables = load_hf(str(d))
    ref = G.torch_outputs(hf, inputs)
    errs = _errors(_ours(model, variables, inputs, None), ref,
                   inputs["attention_mask"].astype(bool))
    assert max(errs.values()) < TOL, errs
