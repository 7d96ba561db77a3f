"""experiments/bench.py's peer: Hugging Face's FlaxBigBird block-sparse attention.

The peer needs transformers 4.57.6 (requirements-bench.txt); .ci/run installs it in
its own venv and runs the slow tests here. Without it, the CLI must fail before any
measurement with an error naming the requirement.
"""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench

HAS_FLAX_BIGBIRD = importlib.util.find_spec("transformers") is not None and \
    importlib.util.find_spec("transformers.models.big_bird.modeling_flax_big_bird") is not None


def test_bigbird_pairs_by_hand():
    # T = 28, blocks of 4 (nb = 7): 2 global rows of blocks see all 28 keys; blocks 1 and 5
    # see 4 blocks (+ r random); the 3 middle blocks 5 blocks (+ r random).
    assert bench.bigbird_pairs(28, 4, 0) == 2 * 4 * 28 + 2 * 4 * 16 + 3 * 4 * 20 == 592
    assert bench.bigbird_pairs(36, 4, 1) == 2 * 4 * 36 + 2 * 4 * 20 + 5 * 4 * 24
    with pytest.raises(ValueError, match="T=30, block=4"):
        bench.bigbird_pairs(30, 4, 1)
    with pytest.raises(ValueError, match=">= 11 blocks; got T=40, block=4, num_random=3"):
        bench.bigbird_pairs(40, 4, 3)


@pytest.mark.skipif(HAS_FLAX_BIGBIRD, reason="checks the error when transformers is absent")
def test_peer_without_transformers_names_the_requirement(capsys):
    with pytest.raises(ImportError, match=r"transformers==4\.57\.6.*requirements-bench\.txt"):
        bench.main(["--peer=flax_bigbird", "--seq_lens=1024", "--globals=1", "--reps=1",
                    "--memory_len=0"])
    assert "| T |" not in capsys.readouterr().out  # nothing measured first


def _value_pattern(T: int, block: int, num_random: int, deterministic: bool) -> np.ndarray:
    """[T, T] bool: which values each output row of FlaxBigBird depends on (its Jacobian
    w.r.t. v is p_ij * I, so nonzero exactly on the attended pairs)."""
    f = bench.flax_bigbird(N=1, H=2, block=block, num_random=num_random, max_len=T,
                           random_key=None if deterministic else jax.random.PRNGKey(1))
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 1, T, 2)) for i in range(3))
    mask = jnp.ones((1, T))
    jac = jax.jacrev(lambda v: f(q, k, v, mask)[0, :, 0])(v)  # [T, 1, 1, T, 2]
    return np.asarray(jnp.abs(jac[:, 0, 0, :, 0]) > 0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLAX_BIGBIRD, reason="needs transformers==4.57.6 "
                    "(pip install -r requirements-bench.txt); .ci/run installs it")
def test_bigbird_pairs_is_the_peers_pattern_and_the_cli_runs(capsys):
    # With its random blocks drawn (T = 1024 is one of the lengths where HF draws them),
    # the pairs FlaxBigBird attends are exactly bigbird_pairs.
    assert _value_pattern(1024, 64, 3, deterministic=False).sum() == bench.bigbird_pairs(1024, 64, 3)
    # Deterministic, it points every random block at block 0 (already global): the work of
    # the full pattern, the distinct pairs of the pattern without random blocks.
    assert _value_pattern(1024, 64, 3, deterministic=True).sum() == bench.bigbird_pairs(1024, 64, 0)
    with pytest.raises(ValueError, match="num_random >= 1; got block=16, num_random=0"):
        bench.flax_bigbird(N=2, H=8, block=16, num_random=0, max_len=256)
    f = bench.flax_bigbird(N=2, H=8, block=16, num_random=1, max_len=256)
    q = jax.random.normal(jax.random.key(0), (1, 2, 256, 8))
    out = f(q, q, q, jnp.ones((1, 256)))
    assert out.shape == (1, 256, 16) and bool(jnp.isfinite(out).all())
    bench.main(["--peer=flax_bigbird", "--seq_lens=1024", "--globals=1", "--reps=1",
                "--memory_len=0", "--dense_max_len=0", "--bigbird_block=64"])
    out = capsys.readouterr().out
    assert "| 1024 | 1 |" in out and "Ours (window + G globals) vs FlaxBigBird" in out
    assert "at T >= 4096: not measured (no T >= 4096)" in out  # never "met" by default
    assert "at T = 8192: not measured (no T = 8192)" in out
