"""Streaming KV cache (layout, oracle, model equality, one trace, fixed memory) and the sinks run.

The oracle chain: a literal per-query StreamingLLM computation (cache contents
re-indexed 0..n-1, RoPE, softmax) checks :func:`sink_window_attention`; that
checks :func:`cache_attention` step by step; at model level the streamed
logits equal ``CausalLM.windowed`` everywhere and the ordinary full forward
while nothing has been evicted. Models are tiny (d 16, 2 layers).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from globalattn import dense_attention
from globalattn.modules import decode
from globalattn.ops import streaming
from globalattn.data import charlm
from globalattn.modules.lm import CausalLM
from globalattn.ops.rope import apply_rope
from globalattn.train.config import apply_overrides, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, N, H = 2, 2, 8
TINY = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, mlp_dim=32)


def _jit(f, **kw):
    # Tiny graphs: compile time dominates, so skip XLA's backend optimisations. Eager
    # op-by-op execution of a whole model is slower still (one compile per op).
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def _qkv(seed: int, T: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (B, T, N, H)) for k in keys)


# ---------------------------------------------------------------------------------------
# The cache layout.


@pytest.mark.parametrize("G,W", [(0, 1), (0, 4), (1, 3), (3, 2), (2, 5)])
def test_cache_layout_is_streamingllm(G, W):
    """Writes keep sinks 0..G-1 and the last W tokens; positions are ranks in the cache."""
    held = [None] * (G + W)  # stream index in each slot, tracked through the writes
    layout = _jit(functools.partial(streaming.cache_layout, num_sink_slots=G, window=W))
    for t in range(3 * (G + W) + 2):
        write, pos, valid, query = jax.device_get(layout(jnp.int32(t)))
        held[int(write)] = t
        want = sorted(set(range(min(t + 1, G))) | set(range(max(G, t - W + 1), t + 1)))
        got = sorted(held[s] for s in range(G + W) if valid[s])
        assert got == want, (t, got, want)
        for s in range(G + W):
            if valid[s]:
                assert pos[s] == want.index(held[s]), (t, s)
        assert query == want.index(t) == min(t, G + W - 1)


def test_bad_cache_shapes_are_errors():
    with pytest.raises(ValueError, match="window must be a positive int"):
        streaming.init_cache(1, 1, 1, 2, num_sink_slots=2, window=0)
    with pytest.raises(ValueError, match="num_sink_slots must be a non-negative int"):
        streaming.cache_layout(0, num_sink_slots=-1, window=2)
    q = jnp.zeros((B, N, H))
    with pytest.raises(ValueError, match="G \\+ W"):
        streaming.cache_attention(q, q, q, jnp.zeros((B, 5, N, H)), jnp.zeros((B, 5, N, H)), 0,
                                  num_sink_slots=1, window=3)


# ---------------------------------------------------------------------------------------
# The oracle and one layer of cache attention.


def _np_rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """RoPE in float64 numpy, pair (f, f + H/2) as a complex number."""
    h = x.shape[-1] // 2
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(
        1j * pos[:, None, None] * base ** (-2.0 * np.arange(h) / x.shape[-1]))
    return np.concatenate([z.real, z.imag], axis=-1)


def _literal_streaming(q, k, v, G, W, sinks=None):
    """Per query t: attend over the cache contents re-indexed 0..n-1, query at n-1 (numpy)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for t in range(q.shape[1]):
        held = sorted(set(range(min(t + 1, G))) | set(range(max(G, t - W + 1), t + 1)))
        n = len(held)
        kr = np.stack([_np_rope(k[b, held], np.arange(n)) for b in range(q.shape[0])])
        qr = np.stack([_np_rope(q[b, t:t + 1], np.array([n - 1]))[0] for b in range(q.shape[0])])
        s = np.einsum("bnh,bsnh->bns", qr, kr) / math.sqrt(q.shape[-1])
        extra = np.zeros(s.shape[:2] + (0,)) if sinks is None else \
            np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None], s.shape[:2] + (1,))
        full = np.concatenate([s, extra], axis=-1)
        p = np.exp(full - full.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        out[:, t] = np.einsum("bns,bsnh->bnh", p[..., :n], v[:, held])
    return out


@pytest.mark.parametrize("G,W,with_sinks", [(0, 3, False), (2, 3, True), (1, 4, False),
                                            (3, 1, True)])
def test_oracle_and_cache_attention_match_the_literal_definition(G, W, with_sinks):
    T = 13
    q, k, v = _qkv(G * 10 + W, T)
    sinks = jnp.array([0.5, -1.0]) if with_sinks else None
    oracle = _jit(functools.partial(streaming.sink_window_attention, num_sink_slots=G,
                                    window=W))(q, k, v, sinks=sinks)
    np.testing.assert_allclose(oracle, _literal_streaming(q, k, v, G, W, sinks), atol=2e-5)

    keys = jnp.zeros((B, G + W, N, H))
    values = jnp.zeros_like(keys)
    step = _jit(functools.partial(streaming.cache_attention, num_sink_slots=G, window=W,
                                  sinks=sinks))
    for t in range(T):
        out, keys, values = step(q[:, t], k[:, t], v[:, t], keys, values, jnp.int32(t))
        np.testing.assert_allclose(out, oracle[:, t], atol=2e-5, err_msg=f"t={t}")
        assert np.all(np.isfinite(out))


def test_oracle_without_eviction_is_causal_rope_attention():
    T = 9
    q, k, v = _qkv(1, T)

    @_jit
    def all_ways(q, k, v):
        pos = jnp.arange(T)
        dense = dense_attention(apply_rope(q, pos), apply_rope(k, pos), v,
                                jnp.tril(jnp.ones((T, T), bool)), sinks=jnp.zeros((N,)))
        return dense, [streaming.sink_window_attention(q, k, v, num_sink_slots=G, window=W,
                                                       sinks=jnp.zeros((N,)))
                       for G, W in [(0, None), (0, T), (2, T), (4, T - 4)]]

    dense, others = all_ways(q, k, v)
    for got in others:
        np.testing.assert_allclose(got, dense, atol=2e-5)


def test_oracle_weights_and_nan_padding():
    T = 8
    q, k, v = _qkv(2, T)
    pad = jnp.arange(T)[None] < jnp.array([[8], [5]])
    k = jnp.where(pad[..., None, None], k, jnp.nan)
    v = jnp.where(pad[..., None, None], v, jnp.nan)
    attend = functools.partial(streaming.sink_window_attention, num_sink_slots=1, window=3,
                               padding_mask=pad)

    @_jit
    def run(q, k, v):
        out, w = attend(q, k, v, return_weights=True)
        return out, w, jax.grad(lambda q: jnp.sum(attend(q, k, v)))(q)

    out, w, g = run(q, k, v)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(out[1, 5:], 0.0)
    np.testing.assert_allclose(jnp.sum(w, -1)[0], 1.0, atol=1e-6)
    outside = ~np.asarray(streaming.sink_window_mask(T, num_sink_slots=1, window=3))
    assert not np.any(np.asarray(w)[0][:, outside])


# ---------------------------------------------------------------------------------------
# Model level.


@functools.lru_cache(maxsize=None)
def _model(P: int, sink_logits: str, window=None):
    model = CausalLM(**TINY, num_sink_tokens=P, sink_logits=sink_logits, window=window)
    params = _jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 4), jnp.int32))["params"]))(
        jax.random.key(P))
    if sink_logits == "learned":  # a non-trivial value, not the initial 0
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.7 if "sinks" in jax.tree_util.keystr(p) else x, params)
    return model, params


@functools.lru_cache(maxsize=None)
def _forward(model: CausalLM, method: str = "__call__", **kw):
    """A jitted ``model.apply(params, tokens, method=method, **kw)``."""
    return _jit(lambda params, tokens: model.apply({"params": params}, tokens, method=method, **kw))


def _tokens(seed: int, T: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, T), 0, TINY["vocab_size"])


@pytest.mark.parametrize("P,sink_logits,G,W", [
    (0, "zero", 2, 4),  # softmax-one, data tokens as sinks
    (1, "learned", 1, 6),  # the learned sink token is the one kept
    (2, "none", 3, 3),  # two sink tokens and one data token kept
])
def test_streamed_logits_equal_the_windowed_forward(P, sink_logits, G, W):
    model, params = _model(P, sink_logits)
    tokens = _tokens(P + G, 24)
    streamed = decode.stream_logits(model, params, tokens, num_sink_slots=G, window=W)
    windowed = _forward(model, "windowed", num_sink_slots=G, window=W)(params, tokens)
    full = _forward(model)(params, tokens)
    assert streamed.shape == full.shape == (B, 24, TINY["vocab_size"])
    np.testing.assert_allclose(streamed, windowed, atol=1e-4)
    kept = G + W - P  # data tokens streamed before the first eviction
    np.testing.assert_allclose(streamed[:, :kept], full[:, :kept], atol=1e-4)
    assert np.max(np.abs(streamed[:, kept:] - full[:, kept:])) > 1e-3  # eviction matters
    assert np.all(np.isfinite(streamed))
    if P == 1:  # a stream shorter than the cache is the full forward, all of it
        whole = decode.stream_logits(model, params, tokens, num_sink_slots=G, window=P + 24)
        np.testing.assert_allclose(whole, full, atol=1e-4)


def test_local_window_model_is_the_oracle_without_sinks():
    """Training with the kernel's causal window W = streaming a 0 + W cache."""
    model, params = _model(0, "none", window=4)
    tokens = _tokens(6, 20)
    got = _forward(model)(params, tokens)
    want = _forward(model, "windowed", num_sink_slots=0, window=4)(params, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4)
    streamed = decode.stream_logits(model, params, tokens, num_sink_slots=0, window=4)
    np.testing.assert_allclose(streamed, want, atol=1e-4)


def test_one_trace_fixed_memory_and_generate():
    model, params = _model(1, "learned")
    G, W = 2, 3
    step = decode.make_decode_step(model)
    cache = decode.new_stream(model, params, B, num_sink_slots=G, window=W)
    shapes = jax.tree.map(lambda x: x.shape, cache)
    assert cache.keys.shape == (2, B, G + W, 2, 8) and int(cache.length) == 1
    tokens = _tokens(7, 4 * (G + W))
    logits = []
    for t in range(tokens.shape[1]):
        out, cache = step(params, cache, tokens[:, t])
        logits.append(out)
        assert jax.tree.map(lambda x: x.shape, cache) == shapes
    assert step.num_traces() == 1
    assert int(cache.length) == 1 + tokens.shape[1]
    want = decode.stream_logits(model, params, tokens, num_sink_slots=G, window=W)
    np.testing.assert_allclose(jnp.stack(logits, 1), want, atol=1e-5)

    # Greedy generation continues the stream with the argmax, through the same step.
    prompt = tokens[:, :3]
    got = list(decode.generate(model, params, prompt, 9, num_sink_slots=G, window=W,
                                  rng=jax.random.key(0), temperature=0.0, decode_step=step))
    cache = decode.new_stream(model, params, B, num_sink_slots=G, window=W)
    for t in range(3):
        out, cache = step(params, cache, prompt[:, t])
    for token in got:
        np.testing.assert_array_equal(token, jnp.argmax(out, -1))
        out, cache = step(params, cache, jnp.asarray(token))
    assert step.num_traces() == 1  # nothing recompiled as the stream grew


def test_model_errors():
    model, params = _model(0, "none")
    cache = streaming.init_cache(3, B, 2, 8, num_sink_slots=1, window=2)
    with pytest.raises(ValueError, match="do not fit"):
        model.apply({"params": params}, jnp.zeros((B,), jnp.int32), cache, method="decode")
    with pytest.raises(ValueError, match="one token per row"):
        model.apply({"params": params}, jnp.zeros((B, 2), jnp.int32), cache, method="decode")
    with pytest.raises(ValueError, match="sink_logits"):
        CausalLM(**TINY, sink_logits="one").init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="num_active_globals"):
        model.apply({"params": params}, jnp.zeros((1, 2), jnp.int32), num_active_globals=1)


# ---------------------------------------------------------------------------------------
# The sinks experiment: data, metric, a tiny end-to-end run, generation.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds_charlm"))
    charlm.prepare("tiny", path)
    return path


def test_sink_metric_counts_heads_above_the_threshold():
    from globalattn import measure

    model, params = _model(1, "zero")
    out = measure.sink_metric(model, params, np.asarray(_tokens(9, 12)), threshold=0.3)
    alpha = np.asarray(out["alpha"])
    assert alpha.shape == (2, 2) and np.all((alpha > 0) & (alpha < 1))
    assert out["metric"] == np.mean(alpha > 0.3)
    assert 0.0 < out["sink_logit_mass"] < 1.0
    # Where the attention goes: a band of every key holds all of it but the sink column's.
    tokens = np.asarray(_tokens(9, 12))
    S = tokens.shape[1] + 1  # the sink token
    whole = measure.sink_metric(model, params, tokens, threshold=0.3, local=S)
    np.testing.assert_allclose(whole["local_mass"], 1.0 - out["sink_logit_mass"], rtol=1e-5)
    maps = model.apply({"params": params}, jnp.asarray(tokens), method="attention_weights")
    own = measure.sink_metric(model, params, tokens, threshold=0.3, local=1)["local_mass"]
    np.testing.assert_allclose(own, np.mean(np.diagonal(np.asarray(maps), axis1=-2, axis2=-1)),
                               rtol=1e-5)
    assert own < out["local_mass"] < whole["local_mass"]
    with pytest.raises(ValueError, match="local must be an int >= 1, got 0"):
        measure.sink_metric(model, params, tokens, threshold=0.3, local=0)


def test_lm_config_builds_the_causal_lm():
    """model.arch='lm' is CausalLM with the config's sinks, dense or windowed."""
    from globalattn.modules import build_model
    from globalattn.train.config import validate_config

    config = load_config(os.path.join(ROOT, "configs", "sinks.py:test"))
    spec = validate_config(apply_overrides(config, {"model.lm.num_sink_tokens": 2,
                                                    "model.lm.sink_logits": "learned"}))
    model = build_model(spec.model_config)
    assert isinstance(model, CausalLM) and spec.capacity == 2
    assert (model.window, model.num_sink_tokens, model.sink_logits) == (None, 2, "learned")
    windowed = build_model(spec.model_config.replace(attention_schedule="global_local", window=3))
    assert windowed.window == 4  # radius 3 back + the query's own token
    with pytest.raises(ValueError, match="does not fit task 'charlm'"):
        validate_config(apply_overrides(config, {"model.head": "token"}))
    with pytest.raises(ValueError, match="sink_logits"):
        build_model(spec.model_config.replace(
            lm=dataclasses.replace(spec.model_config.lm, sink_logits="one")))


def test_train_load_and_generate(data_dir, tmp_path, capsys):
    """The LM trains through train_and_evaluate; generate loads its standard checkpoint."""
    from experiments import generate
    from globalattn.train import train_and_evaluate
    from globalattn.train.trained import load_run

    config = apply_overrides(load_config(os.path.join(ROOT, "configs", "sinks.py:test")),
                             {"data.data_dir": data_dir, "model.lm.num_sink_tokens": 1,
                              "model.num_layers": 1})
    workdir = str(tmp_path / "sink_token")
    result = train_and_evaluate(config, workdir)
    assert result["step"] == 3 and math.isfinite(result["validation/loss"])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    loaded, model, params = load_run(workdir)
    assert isinstance(model, CausalLM) and model.num_sink_tokens == 1
    assert loaded.model.lm.num_sink_tokens == 1
    logits = model.apply({"params": params}, jnp.asarray(_tokens(2, 5)))
    assert logits.shape == (2, 5, 128) and np.isfinite(np.asarray(logits)).all()

    capsys.readouterr()
    text = generate.main([f"--workdir={workdir}", "--prompt=def ", "--num_chars=12",
                          "--initial_tokens=2", "--temperature=0"])
    out = capsys.readouterr()
    assert len(text) == 12 and out.out.startswith("def ")
    assert "1 decode-step trace(s)" in out.err
    with pytest.raises(SystemExit):
        generate.main([f"--workdir={tmp_path / 'missing'}", "--prompt=x"])


def test_load_run_refuses_a_workdir_without_a_run(tmp_path):
    from globalattn.train.trained import load_run

    with pytest.raises(FileNotFoundError, match="holds no trained run"):
        load_run(str(tmp_path))


@pytest.mark.slow
def test_reproduce_sinks_quick(tmp_path):
    """The --quick smoke run as a user runs it (a few minutes on 2 cores)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run(
        [sys.executable, "-m", "experiments.reproduce", "sinks", "--quick",
         f"--workdir={tmp_path}", f"--data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (tmp_path / "sinks.md").read_text()
    assert "--quick" in report and "| vanilla |" in report and "| 1 learnable sink token |" in report
    assert (tmp_path / "sinks.png").exists() and (tmp_path / "sinks.json").exists()
    # The README's generate command works on the variant directories it wrote.
    res = subprocess.run(
        [sys.executable, "-m", "experiments.generate", f"--workdir={tmp_path / 'sink_token'}",
         "--prompt=def ", "--num_chars=5"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
