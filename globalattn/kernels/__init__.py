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
