"""Regression test for the jaxlib 0.10.x XLA:CPU miscompile (see globalattn/_xla_workaround.py).

Without the workaround, jit returns values off by ~24 here while numpy agrees.
"""
import jax
import jax.numpy as jnp
import numpy as np


def test_broadcast_multiply_reduce_add_is_compiled_correctly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 16)).astype(np.float32)
    c = rng.standard_normal((64, 80, 16)).astype(np.float32)
    got = jax.jit(lambda c: c + jnp.sum(x[None] * c, -1)[..., None])(c)
    want = c + (x[None] * c).sum(-1)[..., None]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
