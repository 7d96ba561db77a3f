"""Tests for globalattn.modules: strategies, attention modules, encoders, Perceiver, heads.

Models are tiny (d_model 16, T 24) and every (config, shape) is compiled once:
``_built`` caches the model, its initialised variables and a jitted apply, and
the tests share them. Mask-only strategy tests run eagerly on a few tokens.
"""
from __future__ import annotations

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from globalattn import global_local_mask, patterns
from globalattn.modules import (
    STRATEGIES,
    BlockConfig,
    GlobalLocalSelfAttention,
    build_model,
    default_model_config,
    layer_kinds,
)

B, T = 2, 24
LENGTHS = (24, 19)  # example 1 is right-padded
SMALL = dict(vocab_size=32, max_len=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=2,
             window=2, num_classes=5, dropout=0.0)


def _cfg(overrides):
    c = default_model_config()
    for k, v in {**SMALL, **dict(overrides)}.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


def _inputs():
    tokens = jax.random.randint(jax.random.key(7), (B, T), 1, SMALL["vocab_size"])
    pm = jnp.arange(T)[None, :] < jnp.asarray(LENGTHS)[:, None]
    # Segment 0 (the question) is positions 0..5, then the context.
    seg = jnp.broadcast_to((jnp.arange(T) >= 6).astype(jnp.int32), (B, T))
    return tokens, pm, seg


# Tiny models: compile time dominates, and XLA's backend optimisations buy nothing.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(f, **kw):
    return jax.jit(f, compiler_options=_FAST_COMPILE, **kw)


class Built:
    def __init__(self, overrides):
        self.cfg = _cfg(overrides)
        self.model = build_model(self.cfg)
        tokens, pm, seg = _inputs()
        self.variables = nn.unbox(_jit(self.model.init)(jax.random.key(0), tokens, pm, seg))
        self.apply = _jit(self.model.apply, static_argnames=("deterministic",))


@functools.lru_cache(maxsize=None)
def _built_cached(key):
    return Built(key)


def _built(**overrides) -> Built:
    return _built_cached(tuple(sorted(overrides.items())))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _finite(tree):
    for x in jax.tree.leaves(tree):
        assert bool(jnp.all(jnp.isfinite(x))), "non-finite output"


# One config per registry name (and two Perceiver ones); the heads, remat,
# scan, dtype and projection options are spread over them so each is built.
CASES = {
    "none": {"strategy.name": "none", "pooling": "mean"},
    "cls": {"strategy.name": "cls", "global_projections": True},
    "first": {"strategy.name": "first", "strategy.num_globals": 3, "head": "token",
              "remat": True, "dtype": "bfloat16"},
    # Gemma-style schedule (global-local, full, ...), scanned and rematerialised.
    "first_last": {"strategy.name": "first_last", "head": "span", "num_layers": 4,
                   "attention_schedule": "interleaved", "local_per_full": 1, "scan": True,
                   "remat": True},
    "periodic": {"strategy.name": "periodic", "strategy.period": 8, "strategy.num_globals": 3,
                 "pooling": "globals"},
    "task": {"strategy.name": "task", "strategy.num_globals": 8, "head": "span"},
    "bigbird": {"strategy.name": "bigbird", "strategy.block_size": 4,
                "strategy.num_random_blocks": 1, "head": "token", "global_projections": True,
                "dropout": 0.1},
    "extra": {"strategy.name": "extra", "strategy.num_globals": 16, "pooling": "globals",
              "strategy.drop_output": False},
    "sinks": {"strategy.name": "sinks", "strategy.num_globals": 1, "strategy.sink_logits": True,
              "head": "lm", "causal": True},
    "perceiver": {"arch": "perceiver", "perceiver.num_latents": 8},
    "perceiver_token": {"arch": "perceiver", "perceiver.num_latents": 16, "head": "token",
                        "perceiver.share_weights": True},
}


def test_every_registry_name_has_a_case():
    assert set(STRATEGIES) <= {c["strategy.name"] for c in CASES.values() if "strategy.name" in c}


@pytest.mark.parametrize("case", sorted(CASES))
def test_builds_and_runs_forward(case):
    b = _built(**CASES[case])
    tokens, pm, seg = _inputs()
    out = b.apply(b.variables, tokens, pm, seg)
    head = b.cfg.head
    want = {"classify": (B, 5), "token": (B, T, 5), "lm": (B, T, 32)}
    if head == "span":
        assert [o.shape for o in out] == [(B, T), (B, T)]
        assert bool(jnp.all(out[0][1, LENGTHS[1]:] < -1e8))  # padded span positions masked
    else:
        assert out.shape == want[head]
    assert all(o.dtype == jnp.float32 for o in jax.tree.leaves(out))
    _finite(out)
    if case == "bigbird":  # training mode: dropout and resampled random blocks
        other = b.apply(b.variables, tokens, pm, seg, deterministic=False,
                        rngs={"dropout": jax.random.key(3), "random_blocks": jax.random.key(4)})
        out_train = b.apply(b.variables, tokens, pm, seg, deterministic=False,
                            rngs={"dropout": jax.random.key(1), "random_blocks": jax.random.key(2)})
        _finite(out_train)
        assert not np.allclose(out_train, other) and not np.allclose(out_train, out)


# ---------------------------------------------------------------------------
# Parameter counts.
# ---------------------------------------------------------------------------
def _expected_params(cfg) -> int:
    D, M, V, C, L = cfg.d_model, cfg.mlp_dim, cfg.vocab_size, cfg.num_classes, cfg.num_layers
    N = cfg.num_heads
    embed = V * D + cfg.max_len * D + cfg.num_segments * D
    attn = 4 * (D * D + D)
    mlp = D * M + M + M * D + D
    head = {"classify": D * C + C, "token": D * C + C, "span": 2 * D + 2, "lm": D * V + V}[cfg.head]
    if cfg.arch == "perceiver":
        p = cfg.perceiver
        xblock = 3 * 2 * D + attn + mlp
        lblock = 2 * 2 * D + attn + mlp
        n_lat = 1 if p.share_weights else p.num_latent_layers
        query = D if cfg.head == "classify" else 0
        return (embed + p.num_latents * D + 2 * xblock + n_lat * lblock + 2 * 2 * D + query
                + head)
    kinds = layer_kinds(cfg.attention_schedule, L, cfg.local_per_full)
    n_gl = sum(k == "global_local" for k in kinds)
    total = embed + L * (attn + 4 * D + mlp) + 2 * D + head
    s = cfg.strategy
    if cfg.global_projections and s.name != "none":
        total += n_gl * 3 * (D * D + D)
    if s.name in ("extra", "sinks"):
        total += s.num_globals * D
    if s.name == "sinks" and s.sink_logits:
        total += L * N
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_counts(case):
    b = _built(**CASES[case])
    assert _count(b.variables["params"]) == _expected_params(b.cfg)


def test_global_projections_start_as_copies_of_local():
    params = _built(**CASES["cls"]).variables["params"]["encoder"]
    for layer in ("layer_0", "layer_1"):
        attn = params[layer]["attn"]
        for name in ("query", "key", "value"):
            for leaf in ("kernel", "bias"):
                np.testing.assert_array_equal(attn[name][leaf], attn[name + "_global"][leaf])


def test_parameters_carry_logical_axis_names():
    for case in ("bigbird", "first_last", "perceiver", "extra"):
        b = _built(**CASES[case])
        tokens, pm, seg = _inputs()
        boxed = jax.eval_shape(b.model.init, jax.random.key(0), tokens, pm, seg)["params"]
        allowed = {"embed", "heads", "kv", "mlp", "vocab", "layers", None}
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), (case, leaf)
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, leaf.names
        if case == "first_last":  # scanned: a leading 'layers' axis
            kernel = boxed["encoder"]["layers"]["block_0"]["attn"]["query"]["kernel"]
            assert kernel.names == ("layers", "embed", "heads", "kv")


# ---------------------------------------------------------------------------
# Receptive field: gradient support == the pattern composed over the layers.
# ---------------------------------------------------------------------------
NUM_ACTIVE = {"periodic": 2, "extra": 1}


def _expected_global_mask(case, pm, seg):
    """Data-position global mask, written independently of the strategies."""
    pos = jnp.arange(T)[None, :]
    last = jnp.asarray(LENGTHS)[:, None] - 1
    name = CASES[case].get("strategy.name")
    if name == "cls":
        return patterns.cls(pm)
    if name == "first_last":
        return patterns.first_last(pm)
    if name == "periodic":  # period 8, only the first NUM_ACTIVE=2 of them
        return patterns.periodic(pm, 8) & (pos < 16)
    if name == "task":
        return patterns.from_segments(seg, (0,), pm)
    if name == "bigbird":  # block 4: the first block and the last real token's block
        return pm & ((pos // 4 == 0) | (pos // 4 == last // 4))
    return jnp.zeros((B, T), bool)


def _layer_masks(b, gt, ext_pad, ext_glob):
    """Per-layer allowed pairs ``[B, T', T']`` (union over heads)."""
    cfg = b.cfg
    Tp = ext_pad.shape[1]
    causal = jnp.tril(jnp.ones((Tp, Tp), bool)) if cfg.causal else jnp.ones((Tp, Tp), bool)
    masks = []
    for l, kind in enumerate(layer_kinds(cfg.attention_schedule, cfg.num_layers,
                                         cfg.local_per_full)):
        if kind == "full":
            masks.append(ext_pad[:, :, None] & ext_pad[:, None, :] & causal)
            continue
        kw = dict(local_window_size=cfg.window)
        if gt.random_blocks is not None:
            kw = dict(local_window_size=0, random_blocks=gt.random_blocks[l],
                      block_size=cfg.strategy.block_size)
        m = global_local_mask(Tp, global_mask=ext_glob, padding_mask=ext_pad,
                              is_causal=cfg.causal, **kw)
        masks.append(jnp.any(m, axis=1) if m.ndim == 4 else m)
    return masks


RF_CASES = ["none", "cls", "first_last", "periodic", "task", "bigbird", "extra", "sinks"]


@pytest.mark.parametrize("case", RF_CASES)
def test_receptive_field_matches_composed_pattern(case):
    b = _built(**CASES[case])
    tokens, pm, seg = _inputs()
    n = NUM_ACTIVE.get(case)
    D = b.cfg.d_model

    def f(x):
        return b.model.apply(b.variables, x, pm, seg, num_active_globals=n,
                             method="encode_embeddings")

    @_jit
    def dependence(x):
        h, vjp_fn, gt = jax.vjp(f, x, has_aux=True)
        Tp = h.shape[1]
        w = jax.random.normal(jax.random.key(5), (D,)) + 2.0  # no accidental cancellation
        cts = jnp.eye(B * Tp).reshape(B * Tp, B, Tp)[..., None] * w
        # lax.map, not vmap: XLA:CPU (jaxlib 0.10.2) miscompiles the batched
        # VJP at this size (its YNN fusion; see the issue-3 report).
        g = jax.lax.map(lambda ct: vjp_fn(ct)[0], cts.astype(h.dtype))
        return jnp.any(g != 0, axis=-1).reshape(B, Tp, B, T), gt

    x = jax.random.normal(jax.random.key(3), (B, T, D))
    nz, gt = dependence(x)

    P = gt.num_prepended
    slot_on = jnp.arange(P)[None, :] < (P if n is None else n)
    slot_on = jnp.broadcast_to(slot_on, (B, P))
    ext_pad = jnp.concatenate([slot_on, pm], axis=1)
    ext_glob = jnp.concatenate([slot_on, _expected_global_mask(case, pm, seg)], axis=1)
    np.testing.assert_array_equal(gt.padding_mask, ext_pad)
    np.testing.assert_array_equal(gt.global_mask, ext_glob)
    if gt.random_blocks is not None:  # BigBird's 3-block window leads each block list
        nb = T // 4
        win = np.clip(np.arange(nb)[:, None] + np.arange(-1, 2)[None, :], 0, nb - 1)
        np.testing.assert_array_equal(gt.random_blocks[..., :3], np.broadcast_to(
            win, gt.random_blocks.shape[:-1] + (3,)))

    Tp = ext_pad.shape[1]
    eye = jnp.eye(Tp, dtype=bool)
    reach = jnp.broadcast_to(eye, (B, Tp, Tp))
    for m in _layer_masks(b, gt, ext_pad, ext_glob):  # residual: identity always allowed
        reach = jnp.einsum("bik,bkj->bij", (m | eye).astype(jnp.int32),
                           reach.astype(jnp.int32)) > 0
    want = jnp.zeros((B, Tp, B, T), bool)
    for e in range(B):
        want = want.at[e, :, e, :].set(reach[e][:, P:])
    np.testing.assert_array_equal(np.asarray(nz), np.asarray(want))
    # Spelled out: after 2 layers of window 2, token 23 sees token 10 only via a global.
    if case == "cls":
        assert bool(nz[0, 23, 0, 10])
    if case == "none":
        assert not bool(nz[0, 23, 0, 10])


# ---------------------------------------------------------------------------
# Capacity: G slots with n active == a capacity-n model; vmap over n.
# ---------------------------------------------------------------------------
def _vmapped_over_counts(model, variables, counts):
    tokens, pm, seg = _inputs()
    f = lambda v, n: model.apply(v, tokens, pm, seg, num_active_globals=n)  # noqa: E731
    return _jit(jax.vmap(f, in_axes=(None, 0)))(variables, jnp.asarray(counts, jnp.int32))


def _slice_param(variables, path, n):
    flat = traverse_util.flatten_dict(variables)
    flat[path] = flat[path][:n]
    return traverse_util.unflatten_dict(flat)


# name: (config with capacity 16, capacity field, param to slice or None, variables from)
CAPACITY_CASES = {
    "extra": (CASES["extra"], "strategy.num_globals", ("params", "strategy", "global_tokens"),
              "extra"),
    # Periodic has no parameters: any token-head model's variables fit.
    "periodic": ({"strategy.name": "periodic", "strategy.period": 6, "head": "token",
                  "strategy.num_globals": 16}, "strategy.num_globals", None, "first"),
    "perceiver": (CASES["perceiver_token"], "perceiver.num_latents",
                  ("params", "perceiver", "latents"), "perceiver_token"),
}


@pytest.mark.parametrize("case", sorted(CAPACITY_CASES))
def test_padded_capacity_equals_smaller_model(case):
    """Capacity 16 with n active == capacity 4 with n active, vmapped over n."""
    big_cfg, field, shared, source = CAPACITY_CASES[case]
    variables = _built(**CASES[source]).variables
    big = build_model(_cfg(big_cfg))
    small = build_model(_cfg({**big_cfg, field: 4}))
    small_vars = variables if shared is None else _slice_param(variables, shared, 4)
    counts = [0, 1, 2, 4]
    out_big = _vmapped_over_counts(big, variables, counts)
    out_small = _vmapped_over_counts(small, small_vars, counts)
    _finite((out_big, out_small))
    np.testing.assert_allclose(out_big, out_small, atol=2e-5, rtol=2e-5)
    assert not np.allclose(out_big[1], out_big[3], atol=1e-4)  # the count matters
    if case == "extra":  # a vmapped slice equals a plain call (all 4 slots active)
        tokens, pm, seg = _inputs()
        direct = _jit(small.apply)(small_vars, tokens, pm, seg)
        np.testing.assert_allclose(out_small[3], direct, atol=2e-5, rtol=2e-5)


def test_one_trace_for_any_global_count_and_padding():
    b = _built(**CASES["extra"])
    tokens, _, seg = _inputs()

    @_jit
    @chex.assert_max_traces(n=1)
    def f(v, pm, n):
        return b.model.apply(v, tokens, pm, seg, num_active_globals=n)

    for n, lengths in [(0, (24, 3)), (2, (5, 24)), (1, (24, 0))]:
        pm = jnp.arange(T)[None, :] < jnp.asarray(lengths)[:, None]
        _finite(f(b.variables, pm, jnp.int32(n)))


# ---------------------------------------------------------------------------
# Degenerate patterns equal full attention.
# ---------------------------------------------------------------------------
def test_window_covering_sequence_equals_full_attention():
    base = {"strategy.name": "cls", "window": 32, "head": "token"}
    variables = _built(**CASES["first"]).variables  # same parameter structure
    gl = build_model(_cfg(base))
    full = build_model(_cfg({**base, "attention_schedule": "full"}))
    tokens, pm, seg = _inputs()
    out_gl = _jit(gl.apply)(variables, tokens, pm, seg)
    out_full = _jit(full.apply)(variables, tokens, pm, seg)
    _finite(out_gl)
    np.testing.assert_allclose(out_gl, out_full, atol=2e-5, rtol=2e-5)


def test_causal_attention_module_with_covering_window_equals_full():
    tokens, pm, _ = _inputs()
    x = jax.random.normal(jax.random.key(4), (B, T, 16))
    glob = patterns.cls(pm)
    mod = GlobalLocalSelfAttention(BlockConfig(num_heads=2, window=T, causal=True, max_globals=1,
                                               sink_logits="learned", global_projections=True))
    v = nn.unbox(_jit(mod.init)(jax.random.key(0), x, pm, glob))
    v = {"params": {**v["params"], "sinks": jnp.array([0.5, -1.0])}}
    # Full layers have no global projections; they take the local ones.
    v_full = {"params": {k: p for k, p in v["params"].items() if not k.endswith("_global")}}
    out = _jit(mod.apply)(v, x, pm, glob)
    out_full = _jit(mod.clone(kind="full").apply)(v_full, x, pm, glob)
    _finite(out)
    np.testing.assert_allclose(out, out_full, atol=2e-5, rtol=2e-5)


def test_rope_attention_with_covering_window_equals_full_and_is_relative():
    tokens, pm, _ = _inputs()
    x = jax.random.normal(jax.random.key(5), (B, T, 16))
    glob = patterns.cls(pm)
    mod = GlobalLocalSelfAttention(BlockConfig(num_heads=2, window=T, max_globals=1, rope=True,
                                               global_projections=True))
    v = nn.unbox(_jit(mod.init)(jax.random.key(0), x, pm, glob))
    v_full = {"params": {k: p for k, p in v["params"].items() if not k.endswith("_global")}}
    out = _jit(mod.apply)(v, x, pm, glob)
    _finite(out)
    np.testing.assert_allclose(out, _jit(mod.clone(kind="full").apply)(v_full, x, pm, glob),
                               atol=2e-5, rtol=2e-5)
    # Relative: a pattern shifted right by s positions (after s dead padding slots)
    # gives the same outputs, shifted; without RoPE the same holds only because this
    # module has no absolute positions either, so also check RoPE changes the output.
    s_ = 5
    local = mod.clone(config=dataclasses.replace(mod.config, window=2, max_globals=0,
                                                 global_projections=False))
    vl = nn.unbox(_jit(local.init)(jax.random.key(1), x, pm))
    xs = jnp.concatenate([jnp.zeros((B, s_, 16)), x[:, :-s_]], axis=1)
    ones = jnp.ones((B, T), bool)
    a = _jit(local.apply)(vl, x, ones)
    b = _jit(local.apply)(vl, xs, jnp.arange(T)[None, :] >= s_ + jnp.zeros((B, 1), int))
    np.testing.assert_allclose(a[:, 2:T - s_ - 2], b[:, s_ + 2:T - 2], atol=2e-5, rtol=2e-5)
    plain = _jit(local.clone(config=dataclasses.replace(local.config, rope=False)).apply)(
        vl, x, ones)
    assert np.abs(np.asarray(plain - a)).max() > 1e-3


# ---------------------------------------------------------------------------
# Perceiver.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["perceiver", "perceiver_token"])
def test_perceiver_ignores_padded_inputs(case):
    b = _built(**CASES[case])
    tokens, pm, seg = _inputs()
    other = jnp.where(pm, tokens, (tokens + 5) % SMALL["vocab_size"])
    other_seg = jnp.where(pm, seg, 1 - seg)
    out = b.apply(b.variables, tokens, pm, seg)
    out_other = b.apply(b.variables, other, pm, other_seg)
    if b.cfg.head == "token":  # padded query positions are outputs nobody reads
        out, out_other = out[pm], out_other[pm]
    _finite(out)
    np.testing.assert_allclose(out, out_other, atol=1e-6)


def test_perceiver_latents_never_see_nan_padding():
    b = _built(**CASES["perceiver"])
    _, pm, _ = _inputs()
    x = jax.random.normal(jax.random.key(2), (B, T, 16))
    x_nan = jnp.where(pm[..., None], x, jnp.nan)

    @_jit
    def latents(x):
        return b.model.apply(b.variables, x, pm,
                             method=lambda m, x, pm: m.perceiver.encode(x, pm)[0])

    z, z_nan = latents(x), latents(x_nan)
    _finite(z_nan)
    np.testing.assert_allclose(z, z_nan, atol=1e-6)


# ---------------------------------------------------------------------------
# Encoder: scan and remat change nothing.
# ---------------------------------------------------------------------------
def _unstack(params, num_layers, period):
    """Scanned ``encoder/layers/block_p[r]`` -> unrolled ``encoder/layer_{r*period+p}``."""
    enc = dict(params["encoder"])
    blocks = enc.pop("layers")
    for i in range(num_layers):
        r, p = divmod(i, period)
        enc[f"layer_{i}"] = jax.tree.map(lambda x: x[r], blocks[f"block_{p}"])
    return {**params, "encoder": enc}


def _restack(params, num_layers, period):
    """Unrolled ``encoder/layer_{r*period+p}`` -> scanned ``encoder/layers/block_p[r]``."""
    enc = dict(params["encoder"])
    layers = [enc.pop(f"layer_{i}") for i in range(num_layers)]
    enc["layers"] = {f"block_{p}": jax.tree.map(lambda *xs: jnp.stack(xs), *layers[p::period])
                     for p in range(period)}
    return {**params, "encoder": enc}


def test_scan_passes_each_layer_its_random_blocks():
    """BigBird under scan: layer l gets draw l, as in the unrolled stack."""
    b = _built(**CASES["bigbird"])
    scanned = build_model(_cfg({**CASES["bigbird"], "scan": True}))
    tokens, pm, seg = _inputs()
    params = _restack(b.variables["params"], 2, 1)
    out = _jit(scanned.apply)({"params": params}, tokens, pm, seg)
    np.testing.assert_allclose(out, b.apply(b.variables, tokens, pm, seg), atol=1e-5, rtol=1e-5)


def test_scan_and_remat_match_unrolled_layers():
    scanned = _built(**CASES["first_last"])
    plain = build_model(_cfg({**CASES["first_last"], "scan": False, "remat": False}))
    tokens, pm, seg = _inputs()
    params = scanned.variables["params"]

    def loss(model):
        def f(p):
            start, end = model.apply({"params": p}, tokens, pm, seg)
            return jnp.sum(jnp.where(pm, start * end, 0.0))
        return f

    l1, g1 = _jit(jax.value_and_grad(loss(scanned.model)))(params)
    l2, g2 = _jit(jax.value_and_grad(loss(plain)))(_unstack(params, 4, 2))
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    chex.assert_trees_all_close(_unstack(g1, 4, 2), g2, atol=1e-5, rtol=1e-4)
    _finite(g1)


def test_sequence_longer_than_max_len_is_an_error():
    b = _built(**CASES["none"])
    tokens = jnp.ones((1, SMALL["max_len"] + 1), jnp.int32)
    with pytest.raises(ValueError, match="max_len=32"):
        jax.eval_shape(b.model.apply, b.variables, tokens, jnp.ones(tokens.shape, bool))


def test_encode_drops_or_keeps_prepended_tokens():
    tokens, pm, seg = _inputs()
    for drop, width in ((False, 16 + T), (True, T)):
        b = _built(**CASES["extra"])
        model = build_model(_cfg({**CASES["extra"], "strategy.drop_output": drop}))
        h = jax.eval_shape(functools.partial(model.apply, method="encode"),
                           b.variables, tokens, pm, seg)
        assert h.shape == (B, width, SMALL["d_model"])


# ---------------------------------------------------------------------------
# Task strategy: an over-long question is loud, never truncated.
# ---------------------------------------------------------------------------
def test_question_longer_than_capacity_is_loud():
    b = _built(**CASES["task"])  # capacity 8
    tokens, pm, seg = _inputs()
    long_q = seg.at[0, :10].set(0)  # example 0: a 10-token question
    start, end = b.apply(b.variables, tokens, pm, long_q)  # under jit: NaN, that example only
    assert bool(jnp.all(jnp.isnan(start[0]))) and bool(jnp.all(jnp.isnan(end[0])))
    _finite((start[1], end[1]))
    with pytest.raises(ValueError, match="max_globals=8"):  # outside jit: an error
        b.model.apply(b.variables, tokens, pm, long_q)
