"""globalattn: global tokens in attention, in JAX/Flax.

The public attention API lives at the top level:

* :func:`dense_attention` -- the O(T*S) masked-softmax oracle.
* :func:`global_local_mask` -- the dense boolean pattern (tests, analysis).
* :func:`global_local_attention` -- the efficient sliding-window + global-token
  (+ BigBird random block) attention.
* :func:`random_block_indices` -- BigBird random blocks from a jax.random key.
* :func:`sequence_parallel_global_local_attention` -- the same, sharded along T
  with ``jax.shard_map`` (see :mod:`globalattn.sharding` for meshes).

Submodules: ``ops`` (the pure JAX attention ops behind the names above),
``kernels`` (accelerator backends), ``patterns`` (global-mask helpers),
``analytics`` (pattern counting, hops, connectivity), ``modules`` (Flax),
``data`` (TFDS tasks), ``train`` (training loop).
"""
from globalattn import _xla_workaround

_xla_workaround.apply()  # before any backend exists; see the module docstring

from globalattn import ops  # noqa: E402
from globalattn.ops import *  # noqa: E402,F401,F403  (the public attention API)

__all__ = list(ops.__all__)
