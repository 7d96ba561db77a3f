"""Tests for the global-token strategies (on their own) and for model configs.

Strategies run jitted on a few tokens; config checks only build models.
Model-level behaviour (receptive fields, capacity equivalence, heads) is in
test_modules.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from globalattn import patterns
from globalattn.modules import (
    STRATEGIES,
    BigBirdGlobals,
    ExtraTokens,
    ModelConfig,
    build_model,
    build_strategy,
    default_model_config,
)

B, T = 2, 24
LENGTHS = (24, 19)


def _inputs():
    pm = jnp.arange(T)[None, :] < jnp.asarray(LENGTHS)[:, None]
    seg = jnp.broadcast_to((jnp.arange(T) >= 6).astype(jnp.int32), (B, T))  # question 0..5
    return pm, seg


def _jit(f):
    # Tiny graphs: compile time dominates, so skip XLA's backend optimisations.
    return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _cfg(overrides):
    c = default_model_config()
    small = dict(vocab_size=32, max_len=32, d_model=16, num_heads=2, mlp_dim=32, num_layers=2)
    for k, v in {**small, **overrides}.items():
        node = c
        *path, leaf = k.split(".")
        for p in path:
            node = node[p]
        node[leaf] = v
    return c


# ---------------------------------------------------------------------------
# Strategies on their own (eager, a few tokens).
# ---------------------------------------------------------------------------
def _strategy_out(strategy, n=None, segment_ids=None, pm=None, deterministic=True, rngs=None):
    pm0, seg = _inputs()
    pm = pm0 if pm is None else pm
    x = jnp.zeros(pm.shape + (4,))
    seg = seg if segment_ids is None else segment_ids
    variables = {}  # only ExtraTokens/SinkTokens have parameters
    if isinstance(strategy, ExtraTokens):
        variables = strategy.init(jax.random.key(0), x, pm, seg, num_active=n)
    return _jit(lambda v, pm, seg, n: strategy.apply(
        v, x, pm, seg, num_active=n, deterministic=deterministic, rngs=rngs))(
            variables, pm, seg, n)


def _check_slots(gt):
    """positions/slot_valid list exactly the global positions, in order."""
    for e in range(gt.global_mask.shape[0]):
        want = np.flatnonzero(np.asarray(gt.global_mask[e]))
        got = np.asarray(gt.positions[e])[np.asarray(gt.slot_valid[e])]
        np.testing.assert_array_equal(got, want)


def test_position_strategies_match_pattern_helpers():
    pm, seg = _inputs()
    pos = jnp.arange(T)[None, :]
    left_pad = jnp.arange(T)[None, :] >= jnp.asarray([[0], [5]])  # example 1 left-padded
    cases = [
        (STRATEGIES["none"](), None, pm, jnp.zeros((B, T), bool)),
        (STRATEGIES["cls"](), None, left_pad, patterns.cls(left_pad)),
        (STRATEGIES["first_last"](), None, pm, patterns.first_last(pm)),
        (STRATEGIES["first_last"](), None, left_pad, patterns.first_last(left_pad)),
        (STRATEGIES["first"](num_globals=3), None, left_pad,
         left_pad & (jnp.cumsum(left_pad, axis=1) <= 3)),
        (STRATEGIES["periodic"](num_globals=4, period=6), None, pm, patterns.periodic(pm, 6)),
        # period None spreads G = 3 over T = 24: every 8th.
        (STRATEGIES["periodic"](num_globals=3), None, pm, patterns.periodic(pm, 8)),
        (STRATEGIES["periodic"](num_globals=4, period=6), jnp.asarray([1, 3]), pm,
         patterns.periodic(pm, 6) & (pos < jnp.asarray([[6], [18]]))),
        (STRATEGIES["task"](num_globals=8), None, pm, patterns.from_segments(seg, (0,), pm)),
        (STRATEGIES["task"](num_globals=8), 2, pm,
         patterns.from_segments(seg, (0,), pm) & (pos < 2)),
    ]
    for strategy, n, mask, want in cases:
        gt = _strategy_out(strategy, n=n, pm=mask)
        np.testing.assert_array_equal(gt.global_mask, want, err_msg=repr(strategy))
        np.testing.assert_array_equal(gt.padding_mask, mask)
        assert gt.positions.shape == (B, strategy.capacity)
        _check_slots(gt)


def test_extra_tokens_prepend_active_slots_as_padding_otherwise():
    s = STRATEGIES["extra"](num_globals=3)
    pm, _ = _inputs()
    gt = _strategy_out(s, n=jnp.asarray([3, 1]))
    assert gt.x.shape == (B, 3 + T, 4) and gt.num_prepended == 3
    slots = np.array([[1, 1, 1], [1, 0, 0]], bool)
    np.testing.assert_array_equal(gt.padding_mask[:, :3], slots)
    np.testing.assert_array_equal(gt.global_mask[:, :3], slots)
    np.testing.assert_array_equal(gt.padding_mask[:, 3:], pm)
    assert not bool(jnp.any(gt.global_mask[:, 3:]))
    _check_slots(gt)


def test_bigbird_random_blocks_policy():
    s = BigBirdGlobals(block_size=4, num_random_blocks=2, num_layers=3, num_heads=2)
    ev1 = _strategy_out(s).random_blocks
    ev2 = _strategy_out(s).random_blocks
    assert ev1.shape == (3, 1, 2, T // 4, 3 + 2)
    np.testing.assert_array_equal(ev1, ev2)  # eval: the fixed key
    assert not np.array_equal(ev1[0], ev1[1])  # a fresh draw per layer
    tr = lambda k: _strategy_out(s, deterministic=False,  # noqa: E731
                                 rngs={"random_blocks": jax.random.key(k)}).random_blocks
    np.testing.assert_array_equal(tr(1), tr(1))
    assert not np.array_equal(tr(1), tr(2))  # train: resampled from the rng stream
    with pytest.raises(ValueError, match="random_blocks"):
        _strategy_out(s, deterministic=False)
    fixed = s.clone(train_random="fixed")
    np.testing.assert_array_equal(_strategy_out(fixed, deterministic=False).random_blocks, ev1)
    per_example = s.clone(per_example=True)
    pm, _ = _inputs()
    shapes = jax.eval_shape(lambda: per_example.apply({}, jnp.zeros((B, T, 4)), pm))
    assert shapes.random_blocks.shape == (3, B, 2, T // 4, 5)


def test_strategy_input_errors():
    with pytest.raises(ValueError, match="segment_ids"):
        STRATEGIES["task"]().apply({}, jnp.zeros((B, T, 4)), jnp.ones((B, T), bool), None)
    with pytest.raises(ValueError, match=r"num_globals=2 \* period=4"):
        _strategy_out(STRATEGIES["periodic"](num_globals=2, period=4))
    with pytest.raises(ValueError, match=r"capacity=2"):
        _strategy_out(STRATEGIES["extra"](num_globals=2), n=3)
    with pytest.raises(ValueError, match="integer"):
        _strategy_out(STRATEGIES["first"](num_globals=2), n=1.5)


# ---------------------------------------------------------------------------
# Config: every bad value is a ValueError naming it.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"d_model": 30, "num_heads": 4}, "d_model=30"),
    ({"head": "lm"}, "causal=True"),
    ({"strategy.name": "none", "pooling": "globals"}, "'none' has none"),
    ({"strategy.name": "nope"}, "'nope'"),
    ({"scan": True, "attention_schedule": "interleaved", "local_per_full": 2, "num_layers": 4},
     "num_layers=4"),
    ({"strategy.name": "sinks", "strategy.num_globals": 0}, "sink_logits"),
    ({"strategy.name": "bigbird", "strategy.window_blocks": 2}, "odd"),
    ({"strategy.name": "bigbird", "strategy.train_random": "sometimes"}, "train_random"),
    ({"strategy.name": "bigbird", "strategy.block_size": 64}, "block_size=64"),
    ({"arch": "perceiver", "head": "lm", "causal": True}, "perceiver"),
    ({"dropout": 1.0}, "dropout"),
    ({"dtype": "float8"}, "float8"),
    ({"attention_schedule": "sometimes"}, "sometimes"),
    ({"pooling": "max"}, "'max'"),
    ({"window": -1}, "window"),
])
def test_bad_config_raises_naming_the_value(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(_cfg(overrides))


def test_config_is_locked_and_partial_configs_merge():
    c = default_model_config()
    with pytest.raises(AttributeError):
        c.windw = 3
    with pytest.raises(ValueError, match="strategy.nmae"):
        build_model({"strategy": {"nmae": "cls"}})
    with pytest.raises(ValueError, match="'window'"):
        build_model({"window": "wide"})
    model = build_model({"strategy": {"name": "extra"}, "head": "token"})
    assert model.strategy.capacity == 4 and model.encoder.block.max_globals == 4


def test_registry_capacity_and_frozen_model_config():
    for name in STRATEGIES:
        over = {"strategy.name": name}
        if name == "sinks":
            over["strategy.num_globals"] = 2
        mc = ModelConfig.from_config(_cfg(over))
        model = build_model(mc)
        assert mc.capacity == model.strategy.capacity == build_strategy(mc).capacity, name
        assert model.encoder.block.max_globals == mc.capacity
        assert model.encoder.block.window == ((0, 0) if name == "bigbird" else mc.window)
    mc = ModelConfig.from_config(_cfg({}))
    assert ModelConfig.from_config(mc) is mc  # built once, passed on as is
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.window = 3
    with pytest.raises(ValueError, match="d_model=15"):
        mc.replace(d_model=15)  # every construction validates
    with pytest.raises(ValueError, match="'nope'"):
        mc.replace(strategy=dataclasses.replace(mc.strategy, name="nope"))
