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


def _python(code: str, **env) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ.update(JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_import_after_a_cpu_backend_exists_is_refused_unless_accepted():
    import jaxlib

    if not jaxlib.__version__.startswith("0.10."):
        return  # the flag exists only on affected versions; nothing to refuse elsewhere
    late = "import jax; jax.numpy.zeros(1); import globalattn"
    r = _python(late)
    assert r.returncode != 0 and "ImportError" in r.stderr and "XLA_FLAGS=" in r.stderr, r.stderr
    assert _python(late, GLOBALATTN_ALLOW_UNPATCHED_XLA="1").returncode == 0
    flagged = _python(late, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
    assert flagged.returncode == 0, flagged.stderr
    early = _python("import globalattn, os; assert 'ynn_fusion_type' in os.environ['XLA_FLAGS']")
    assert early.returncode == 0, early.stderr
