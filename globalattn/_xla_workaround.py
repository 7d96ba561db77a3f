"""Work around a silent XLA:CPU miscompile in jaxlib 0.10.x.

XLA:CPU's "YNN fusion" miscompiles a broadcast-multiply -> reduce ->
broadcast-add pattern once the batch exceeds ~25-32 rows: jit returns wrong
numbers with no error (reproduced in tests/test_xla_workaround.py; it corrupts
e.g. batched VJPs through LayerNorm). Disabling that fusion fixes it.

XLA reads XLA_FLAGS when the first backend is created, so the flag is appended
at import of globalattn. It is added only for jaxlib versions known to have the
flag (an unknown flag aborts XLA). If a CPU backend already exists without the
flag -- a JAX array was created before ``import globalattn`` -- the protection
cannot hold, and importing globalattn raises ImportError saying how to fix it
(import globalattn first, or set the flag before starting Python), unless
``GLOBALATTN_ALLOW_UNPATCHED_XLA=1`` says the risk of wrong numbers is accepted.
"""
from __future__ import annotations

import os
import warnings

_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
_AFFECTED_PREFIXES = ("0.10.",)


def apply() -> bool:
    """Adds the flag to XLA_FLAGS if needed. Returns True when it is in effect."""
    import jaxlib

    if not jaxlib.__version__.startswith(_AFFECTED_PREFIXES):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return True
    from jax._src import xla_bridge

    backends = getattr(xla_bridge, "_backends", None) or {}
    if backends:
        if "cpu" not in backends:
            return False  # accelerator-only process: XLA:CPU compiles nothing here
        message = (
            f"globalattn: a JAX CPU backend was created before globalattn was imported, so the "
            f"workaround for a silent XLA:CPU miscompile in jaxlib {jaxlib.__version__} (wrong "
            f"numbers, no error) cannot be applied. Import globalattn before creating any JAX "
            f"array, or start Python with XLA_FLAGS={_FLAG} (set "
            f"GLOBALATTN_ALLOW_UNPATCHED_XLA=1 to import anyway and accept wrong results).")
        if os.environ.get("GLOBALATTN_ALLOW_UNPATCHED_XLA") == "1":
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            return False
        raise ImportError(message)
    os.environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()
    return True
