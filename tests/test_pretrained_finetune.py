"""Converting a Hugging Face checkpoint and fine-tuning it through the training loop.

The tiny golden checkpoints (``tests/fixtures/hf_golden``) are converted with
``python -m globalattn.convert hf`` and trained a few steps by each
``configs/finetune_*.py:test`` with ``init_from`` (slow; the default suite
trains each of those configs one step from the unconverted fixture in
tests/test_train.py).
"""
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from globalattn import convert
from globalattn.models import load_hf
from globalattn.models.converted import load_converted
from globalattn.train import init_from as init_from_lib
from globalattn.train.config import apply_overrides, load_config, validate_config
from globalattn.train.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "fixtures", "hf_golden")


def _convert(tmp_path, name):
    out = str(tmp_path / f"{name}_converted")
    assert convert.main(["hf", "--model-dir", os.path.join(GOLDEN, name), "--out", out]) == 0
    return out


def test_convert_round_trip(tmp_path):
    out = _convert(tmp_path, "longformer_qa")
    cfg, params = load_converted(out)
    model, variables = load_hf(os.path.join(GOLDEN, "longformer_qa"))
    assert cfg == model.cfg
    a = flax.traverse_util.flatten_dict(variables["params"])
    b = flax.traverse_util.flatten_dict(params)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k])


def _config(name, init_from, data_data_dir, **over):
    c = load_config(os.path.join(ROOT, "configs", f"{name}.py:test"))
    return apply_overrides(c, {"init_from": init_from, "data.data_dir": data_data_dir, **over})


def _finetune(tmp_path, config_name, ckpt_name, workdir="work", **over):
    ckpt = _convert(tmp_path, ckpt_name)
    config = _config(config_name, ckpt, str(tmp_path / "tfds"), **over)
    losses = []
    result = train_and_evaluate(config, str(tmp_path / workdir),
                                step_callback=lambda step, m: losses.append(float(m["loss"])))
    assert result["step"] == config.num_train_steps == len(losses)
    assert np.all(np.isfinite(losses)), losses
    return ckpt, config, losses


@pytest.mark.parametrize("converted", [True, False])
def test_init_params_are_the_checkpoints(tmp_path, converted):
    """From a converted or a Hugging Face directory: every tensor, the QA head included."""
    ckpt = _convert(tmp_path, "longformer_qa") if converted else os.path.join(GOLDEN,
                                                                               "longformer_qa")
    config = _config("finetune_longformer_qa", ckpt, str(tmp_path / "tfds"))
    spec = validate_config(config, device_count=1, process_count=1)
    model = init_from_lib.build_finetune_model(ckpt, spec.model_config)
    T = spec.seq_len
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros((1, T), jnp.int32),
                            jnp.ones((1, T), bool), jnp.ones((1, T), jnp.int32))
    fresh = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         flax.linen.unbox(shapes["params"]))
    logs = []
    params = init_from_lib.load_init_params(ckpt, flax.core.unfreeze(fresh), log=logs.append)
    assert logs == [f"init_from {ckpt}: loaded ['encoder', 'qa']"]
    _, want = load_hf(os.path.join(GOLDEN, "longformer_qa"))
    got = flax.traverse_util.flatten_dict(params["pretrained"])
    want = flax.traverse_util.flatten_dict(want["params"])
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v))


@pytest.mark.slow
def test_finetune_longformer_qa(tmp_path):
    _finetune(tmp_path, "finetune_longformer_qa", "longformer_qa")


@pytest.mark.slow
def test_finetune_longformer_classify(tmp_path):
    _finetune(tmp_path, "finetune_longformer_classify", "longformer_cls")


@pytest.mark.slow
def test_finetune_bigbird_classify(tmp_path):
    _finetune(tmp_path, "finetune_bigbird_classify", "bigbird_cls")


def test_init_from_checks(tmp_path):
    ckpt = _convert(tmp_path, "longformer_cls")
    config = _config("finetune_longformer_classify", ckpt, str(tmp_path / "tfds"),
                     **{"model.strategy.name": "bigbird"})
    with pytest.raises(ValueError, match="strategy.name='bigbird'.*longformer"):
        validate_config(config, device_count=1, process_count=1)  # the model is built there
    spec = validate_config(_config("finetune_longformer_classify", ckpt, str(tmp_path / "tfds")),
                           device_count=1, process_count=1)
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        init_from_lib.build_finetune_model(str(tmp_path), spec.model_config)


@pytest.mark.slow
def test_finetune_sharded_matches_one_device(tmp_path):
    """Data, FSDP and tensor parallel (2 x 2 x 2 simulated devices): the one-device losses."""
    _, _, one = _finetune(tmp_path, "finetune_longformer_qa", "longformer_qa", "one")
    _, _, sharded = _finetune(tmp_path, "finetune_longformer_qa", "longformer_qa", "sharded",
                              **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
    np.testing.assert_allclose(sharded, one, rtol=1e-4)
