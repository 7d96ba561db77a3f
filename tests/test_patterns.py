"""Tests for globalattn.patterns: global-token selection masks.

Each helper is compared with a plain numpy reference over random padding
(left, right and arbitrary), checked under jit, and its error paths exercised.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import globalattn
from globalattn import analytics, patterns


# --------------------------------------------------------------------------
# Strategies and numpy references.
# --------------------------------------------------------------------------
# A few fixed shapes keep eager-op compilation cached across examples (each
# new shape recompiles every jnp primitive); they cover T = 1, odd, even.
SHAPES = [(1, 1), (1, 6), (3, 7), (2, 16)]


@st.composite
def padding_masks(draw):
    """bool [B, T]: per row one of left-padded, right-padded, arbitrary, all-pad."""
    B, T = draw(st.sampled_from(SHAPES))
    rows = []
    for _ in range(B):
        kind = draw(st.sampled_from(["left", "right", "any", "none", "all"]))
        n = draw(st.integers(0, T))
        if kind == "left":
            row = np.arange(T) >= T - n
        elif kind == "right":
            row = np.arange(T) < n
        elif kind == "any":
            row = np.array(draw(st.lists(st.booleans(), min_size=T, max_size=T)), bool)
        elif kind == "none":
            row = np.zeros(T, bool)
        else:
            row = np.ones(T, bool)
        rows.append(row)
    return np.stack(rows)


def ref_first_last(pad):
    out_first = np.zeros_like(pad)
    out_last = np.zeros_like(pad)
    for b, row in enumerate(pad):
        idx = np.flatnonzero(row)
        if idx.size:
            out_first[b, idx[0]] = True
            out_last[b, idx[-1]] = True
    return out_first, out_last


def ref_periodic(pad, every, offset, from_first_real):
    out = np.zeros_like(pad)
    for b, row in enumerate(pad):
        idx = np.flatnonzero(row)
        shift = idx[0] if (from_first_real and idx.size) else 0
        for p in range(pad.shape[1]):
            q = p - shift
            out[b, p] = row[p] and q >= offset and (q - offset) % every == 0
    return out


# --------------------------------------------------------------------------
# Position-based helpers.
# --------------------------------------------------------------------------
@given(padding_masks())
def test_cls_and_first_last_match_reference(pad):
    first, last = ref_first_last(pad)
    np.testing.assert_array_equal(patterns.cls(jnp.asarray(pad)), first)
    np.testing.assert_array_equal(patterns.first_last(jnp.asarray(pad)), first | last)
    # At most one CLS per example, and never on padding.
    assert (np.asarray(patterns.cls(jnp.asarray(pad))).sum(-1) <= 1).all()


def test_cls_respects_left_padding():
    pad = jnp.array([[False, False, True, True, True], [True, True, True, False, False]])
    np.testing.assert_array_equal(
        patterns.cls(pad), [[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(
        patterns.first_last(pad), [[0, 0, 1, 0, 1], [1, 0, 1, 0, 0]])


def test_shape_argument_equals_all_real_padding():
    full = jnp.ones((2, 7), bool)
    for fn in (patterns.cls, patterns.first_last):
        np.testing.assert_array_equal(fn(shape=(2, 7)), fn(full))
        np.testing.assert_array_equal(fn(full, shape=(2, 7)), fn(full))
    np.testing.assert_array_equal(patterns.periodic(None, 3, 1, shape=(2, 7)),
                                  patterns.periodic(full, 3, 1))
    np.testing.assert_array_equal(patterns.first_last(shape=(1, 1)), [[True]])


@given(padding_masks(), st.integers(1, 25), st.data(), st.booleans())
def test_periodic_matches_reference(pad, every, data, from_first_real):
    offset = data.draw(st.integers(0, pad.shape[1] - 1))
    got = patterns.periodic(jnp.asarray(pad), every, offset, from_first_real=from_first_real)
    np.testing.assert_array_equal(got, ref_periodic(pad, every, offset, from_first_real))


@given(padding_masks(), st.integers(1, 5))
def test_first_last_blocks_matches_reference(pad, bs):
    want = np.zeros_like(pad)
    first, last = ref_first_last(pad)
    for b in range(pad.shape[0]):
        for pos in np.flatnonzero(first[b] | last[b]):
            blk = pos // bs
            want[b, blk * bs:(blk + 1) * bs] = True
    np.testing.assert_array_equal(patterns.first_last_blocks(jnp.asarray(pad), bs), want & pad)


@given(padding_masks(), st.data())
def test_keep_first_keeps_the_first_n_in_position_order(pad, data):
    B = pad.shape[0]
    n = np.array(data.draw(st.lists(st.integers(0, pad.shape[1] + 1), min_size=B, max_size=B)))
    got = np.asarray(jax.jit(patterns.keep_first)(jnp.asarray(pad), jnp.asarray(n)[:, None]))
    for b in range(B):
        idx = np.flatnonzero(pad[b])
        want = np.zeros(pad.shape[1], bool)
        want[idx[:n[b]]] = True
        np.testing.assert_array_equal(got[b], want)


def test_periodic_bigbird_example():
    got = np.asarray(patterns.periodic(None, 4, shape=(1, 10)))[0]
    np.testing.assert_array_equal(np.flatnonzero(got), [0, 4, 8])
    got = np.asarray(patterns.periodic(None, 4, 6, shape=(1, 16)))[0]
    np.testing.assert_array_equal(np.flatnonzero(got), [6, 10, 14])  # p >= offset only


@given(padding_masks(), st.data())
def test_from_positions(pad, data):
    T = pad.shape[1]
    pos = data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=5))
    want = np.zeros_like(pad)
    want[:, pos] = True
    np.testing.assert_array_equal(patterns.from_positions(pos, jnp.asarray(pad)), want & pad)


# --------------------------------------------------------------------------
# Content-based helpers.
# --------------------------------------------------------------------------
@given(padding_masks(), st.data())
def test_from_segments_and_token_ids(pad, data):
    B, T = pad.shape
    seg = np.array(data.draw(st.lists(st.integers(0, 3), min_size=B * T, max_size=B * T)),
                   np.int32).reshape(B, T)
    wanted = data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    want = np.isin(seg, wanted)
    np.testing.assert_array_equal(patterns.from_segments(jnp.asarray(seg), wanted), want)
    np.testing.assert_array_equal(
        patterns.from_segments(jnp.asarray(seg), wanted, jnp.asarray(pad)), want & pad)
    np.testing.assert_array_equal(
        patterns.from_token_ids(jnp.asarray(seg), wanted, jnp.asarray(pad)), want & pad)
    np.testing.assert_array_equal(
        patterns.from_token_ids(jnp.asarray(seg), jnp.asarray(wanted, jnp.int32)), want)


def test_question_tokens_default_segment_zero():
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(patterns.from_segments(seg)[0], [1, 1, 1, 0, 0, 0, 0, 0])


def test_pad_id_listed_is_still_not_global():
    tokens = jnp.array([[101, 7, 102, 0, 0]])
    pad = tokens != 0
    got = patterns.from_token_ids(tokens, (101, 102, 0), pad)
    np.testing.assert_array_equal(got[0], [1, 0, 1, 0, 0])


# --------------------------------------------------------------------------
# Composition.
# --------------------------------------------------------------------------
@given(padding_masks(), st.integers(1, 6))
def test_union_is_or_and_idempotent(pad, every):
    p = jnp.asarray(pad)
    a, b = patterns.cls(p), patterns.periodic(p, every)
    u = patterns.union(a, b)
    np.testing.assert_array_equal(u, np.asarray(a) | np.asarray(b))
    np.testing.assert_array_equal(patterns.union(a, a, a), a)  # duplicates idempotent
    np.testing.assert_array_equal(patterns.union(b, a, u), u)
    assert u.dtype == jnp.bool_ and u.shape == pad.shape


def test_union_broadcasts_batch_one():
    a = jnp.array([[True, False, False]])
    b = jnp.array([[False, False, True], [False, True, False]])
    np.testing.assert_array_equal(patterns.union(a, b), [[1, 0, 1], [1, 1, 0]])


# --------------------------------------------------------------------------
# jit and integration with the attention pattern.
# --------------------------------------------------------------------------
def test_helpers_jit_with_traced_masks():
    pad = jnp.array([[False, True, True, True, True, True, False, False]])
    tokens = jnp.array([[0, 5, 9, 5, 3, 9, 0, 0]])

    @jax.jit
    def select(pad, tokens, ids):
        return patterns.union(
            patterns.cls(pad), patterns.first_last(pad),
            patterns.periodic(pad, 3, 1, from_first_real=True),
            patterns.from_token_ids(tokens, ids, pad))

    got = select(pad, tokens, jnp.array([9]))
    eager = patterns.union(
        patterns.cls(pad), patterns.first_last(pad),
        patterns.periodic(pad, 3, 1, from_first_real=True),
        patterns.from_token_ids(tokens, jnp.array([9]), pad))
    np.testing.assert_array_equal(got, eager)
    np.testing.assert_array_equal(got[0], [0, 1, 1, 0, 0, 1, 0, 0])
    # static arguments through functools.partial also jit.
    per = jax.jit(functools.partial(patterns.periodic, every=2, offset=0))
    np.testing.assert_array_equal(per(pad), patterns.periodic(pad, 2, 0))


def test_masks_feed_global_local_mask_and_analytics():
    pad = jnp.array([[False, False, True, True, True, True, True, True, True, True]])
    glob = patterns.union(patterns.cls(pad), patterns.periodic(pad, 4, 1))
    dense = globalattn.global_local_mask(10, local_window_size=1, global_mask=glob,
                                         padding_mask=pad)
    counts = analytics.row_counts(10, local_window_size=1, global_positions=np.asarray(glob[0]),
                                  padding_mask=np.asarray(pad[0]))
    np.testing.assert_array_equal(np.asarray(dense[0]).sum(-1), counts)


# --------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("call, match", [
    (lambda: patterns.periodic(None, 0, shape=(1, 8)), "every must be a positive int, got 0"),
    (lambda: patterns.periodic(None, -2, shape=(1, 8)), "every must be a positive int, got -2"),
    (lambda: patterns.periodic(None, 2, 8, shape=(1, 8)), r"offset must be an int in \[0, T=8\), got 8"),
    (lambda: patterns.periodic(None, 2, -1, shape=(1, 8)), "got -1"),
    (lambda: patterns.periodic(None, 2.0, shape=(1, 8)), "every must be a positive int, got 2.0"),
    (lambda: patterns.cls(), "got neither"),
    (lambda: patterns.cls(jnp.ones((2, 4), jnp.int32)), "padding_mask must be boolean, got dtype int32"),
    (lambda: patterns.cls(jnp.ones((4,), bool)), r"shape \[B, T\], got \(4,\)"),
    (lambda: patterns.first_last(jnp.ones((2, 4), bool), shape=(2, 5)), "disagrees with shape"),
    (lambda: patterns.cls(shape=(0, 4)), "shape\\[0\\] \\(B\\) must be a positive int, got 0"),
    (lambda: patterns.cls(shape=4), "shape must be a \\(B, T\\) pair"),
    (lambda: patterns.from_positions((3, 9), shape=(1, 8)), r"positions \[9\] out of range"),
    (lambda: patterns.from_positions((), shape=(1, 8)), "positions must be non-empty"),
    (lambda: patterns.from_segments(jnp.zeros((1, 4)), (0,)), "segment_ids must be an integer array, got dtype float32"),
    (lambda: patterns.from_segments(jnp.zeros((1, 4), int), ()), "segments must be non-empty"),
    (lambda: patterns.from_segments(jnp.zeros((1, 4), int), (0.5,)), "segments must contain ints"),
    (lambda: patterns.from_segments(jnp.zeros((1, 4), int), (0,), jnp.ones((1, 5), bool)),
     r"padding_mask shape \(1, 5\) disagrees with segment_ids shape \(1, 4\)"),
    (lambda: patterns.from_token_ids(jnp.zeros((4,), int), (1,)), r"tokens must have shape \[B, T\]"),
    (lambda: patterns.from_token_ids(jnp.zeros((1, 4), int), jnp.zeros((0,), int)), "ids must be a non-empty"),
    (lambda: patterns.from_token_ids(jnp.zeros((1, 4), int), jnp.zeros((2,))), "ids must be a non-empty 1-D integer"),
    (lambda: patterns.union(), "at least one mask"),
    (lambda: patterns.keep_first(jnp.ones((1, 4), bool), jnp.ones((1, 1))), "n must be an integer"),
    (lambda: patterns.first_last_blocks(jnp.ones((1, 4), bool), 0), "block_size must be a positive"),
    (lambda: patterns.union(jnp.ones((1, 4), bool), jnp.ones((1, 5), bool)), "mask shapes disagree"),
    (lambda: patterns.union(jnp.ones((2, 4), bool), jnp.ones((3, 4), bool)), "mask shapes disagree"),
    (lambda: patterns.union(jnp.ones((1, 4), jnp.int32)), "mask 0 must be boolean"),
])
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
