"""Work around a silent XLA:CPU miscompile in jaxlib 0.10.x.

XLA:CPU's "YNN fusion" miscompiles a broadcast-multiply -> reduce ->
broadcast-add pattern once the batch exceeds ~25-32 rows: jit returns wrong
numbers with no error (reproduced in tests/test_xla_workaround.py; it corrupts
e.g. batched VJPs through LayerNorm). Disabling that fusion fixes it.

XLA reads XLA_FLAGS when the first backend is created, so the flag is appended
at import of globalattn. It is added only for jaxlib versions known to have the
flag (an unknown flag aborts XLA); if a backend already exists we warn instead.
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

    if getattr(xla_bridge, "_backends", None):
        warnings.warn(
            "globalattn: a JAX backend was created before globalattn was imported, so the "
            f"workaround for a jaxlib {jaxlib.__version__} CPU miscompile could not be applied. "
            f"Set XLA_FLAGS={_FLAG} before starting Python.", RuntimeWarning, stacklevel=3)
        return False
    os.environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()
    return True
