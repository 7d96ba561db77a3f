"""Rotary position embeddings: the relative-position property the streaming cache relies on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from globalattn.ops.rope import apply_rope, rope_frequencies

B, T, N, H = 2, 7, 3, 8


def _x(seed: int, shape=(B, T, N, H)) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _complex_reference(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Feature pair (f, f + H/2) as one complex number times exp(i * p * theta_f)."""
    h = x.shape[-1] // 2
    theta = base ** (-2.0 * np.arange(h) / x.shape[-1])
    z = (x[..., :h] + 1j * x[..., h:]) * np.exp(1j * positions[..., None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_matches_complex_rotation():
    x = _x(0)
    pos = np.array([[0, 1, 2, 5, 9, 100, 4095], [3, 3, 3, 0, 1, 2, 7]])
    got = apply_rope(x, pos, base=500.0)
    np.testing.assert_allclose(got, _complex_reference(np.asarray(x, np.float64), pos, 500.0),
                               rtol=1e-4, atol=1e-4)


def test_position_zero_is_identity_and_norms_are_kept():
    x = _x(1)
    np.testing.assert_array_equal(apply_rope(x, jnp.zeros((T,), jnp.int32)), x)
    r = apply_rope(x, jnp.arange(T) * 37)
    np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)


@given(a=st.integers(0, 3000), b=st.integers(0, 3000), shift=st.integers(-500, 500))
def test_scores_depend_on_the_offset_only(a, b, shift):
    q, k = _x(2, (1, 1, N, H)), _x(3, (1, 1, N, H))
    score = lambda pa, pb: jnp.sum(apply_rope(q, pa) * apply_rope(k, pb), -1)  # noqa: E731
    ref = score(a, b)
    np.testing.assert_allclose(score(a + shift + 500, b + shift + 500), ref, rtol=2e-3,
                               atol=2e-3)
    np.testing.assert_allclose(score(a - b, 0), ref, rtol=2e-3, atol=2e-3)


def test_positions_broadcast_and_dtype_is_kept():
    x = _x(4)
    per_row = apply_rope(x, jnp.broadcast_to(jnp.arange(T), (B, T)))
    np.testing.assert_array_equal(apply_rope(x, jnp.arange(T)), per_row)
    np.testing.assert_array_equal(apply_rope(x, jnp.arange(T)[None]), per_row)
    xb = x.astype(jnp.bfloat16)
    out = apply_rope(xb, jnp.arange(T))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), per_row, atol=0.05)
    assert np.all(np.isfinite(out.astype(jnp.float32)))


def test_frequencies():
    f = rope_frequencies(8, 10000.0)
    np.testing.assert_allclose(f, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)
    assert f.dtype == np.float32


@pytest.mark.parametrize("head_dim", [0, 3, 7, -2])
def test_odd_or_empty_head_dim_is_an_error(head_dim):
    with pytest.raises(ValueError, match="even head_dim"):
        rope_frequencies(head_dim)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rope(jnp.zeros((1, 2, 3, 5)), jnp.arange(2))
    with pytest.raises(ValueError, match="do not broadcast"):
        apply_rope(_x(5), jnp.arange(T + 1))
    with pytest.raises(ValueError, match=r"\[..., T, N, H\]"):
        apply_rope(jnp.zeros((4, 8)), jnp.arange(4))
    with pytest.raises(ValueError, match="base must be > 1"):
        apply_rope(_x(6), jnp.arange(T), base=1.0)
