"""Accelerator backends of :func:`globalattn.global_local_attention`.

Each backend is selected with ``implementation=`` and must equal the dense
oracle (:func:`globalattn.global_local_reference`) forward and backward; on a
backend other than its own it runs in Pallas interpret mode, so its oracle
tests run on a CPU.
"""

# implementation name -> "module:function" taking a GlobalLocalArgs
# (see globalattn.ops.global_local); imported only when first used.
KERNELS: dict = {
    "pallas_gpu": "globalattn.kernels.pallas_gpu:pallas_gpu_attention",
    "pallas_tpu": "globalattn.kernels.pallas_tpu:pallas_tpu_attention",
}
# Kernels that apply the non-finite-key rule (globalattn.ops.core.non_finite_to_keys)
# to their key / value blocks themselves; the dispatcher applies it for the others
# (two full-size copies of k and v, kept for the backward).
APPLY_NON_FINITE_RULE: frozenset = frozenset({"pallas_tpu"})
