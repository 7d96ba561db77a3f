"""Pure JAX attention ops (no Flax).

* :mod:`~globalattn.ops.dense` -- the dense O(T*S) oracle, the dense pattern
  mask, BigBird random-block indices, global-slot gathering.
* :mod:`~globalattn.ops.global_local` -- :func:`global_local_attention`, the
  efficient sliding-window + global-token (+ random block) attention, with its
  ``implementation=`` dispatch to accelerator kernels (:mod:`globalattn.kernels`).
* :mod:`~globalattn.ops.seq_parallel` -- the same attention with T split over devices.
* :mod:`~globalattn.ops.streaming` -- the fixed-memory KV cache and attention over it.
* :mod:`~globalattn.ops.rope` -- rotary position embeddings.
* :mod:`~globalattn.ops.validate` -- argument checks shared by all of the above.
"""
from globalattn.ops.dense import (
    dense_attention,
    gather_global_positions,
    global_local_mask,
    global_local_reference,
    random_block_indices,
)
from globalattn.ops.global_local import global_local_attention
from globalattn.ops.seq_parallel import sequence_parallel_global_local_attention

__all__ = [
    "dense_attention",
    "gather_global_positions",
    "global_local_attention",
    "global_local_mask",
    "global_local_reference",
    "random_block_indices",
    "sequence_parallel_global_local_attention",
]
