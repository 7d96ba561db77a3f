"""Argument checks for the public attention functions.

Every check raises ValueError naming the offending values. Checks only read
static shapes and dtypes, except :func:`check_random_blocks`, which also checks
index ranges when the indices are concrete (outside jit).
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_positive_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x <= 0:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def check_nonneg_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
        raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    return int(x)


def normalize_window(local_window_size) -> Tuple[int, int]:
    """int w -> (w, w); (left, right) kept. Both must be non-negative ints."""
    if local_window_size is None:
        raise ValueError("local_window_size is required (use (0, 0) for no local window)")
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
        w = int(local_window_size)
        if w < 0:
            raise ValueError(f"local_window_size must be >= 0, got {w}")
        return w, w
    try:
        left, right = local_window_size
    except (TypeError, ValueError):
        raise ValueError(
            f"local_window_size must be an int or a (left, right) pair, got {local_window_size!r}"
        ) from None
    for name, x in (("left", left), ("right", right)):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < 0:
            raise ValueError(
                f"local_window_size {name} must be a non-negative int, got {local_window_size!r}")
    return int(left), int(right)


def check_qkv(q, k, v) -> Tuple[int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, T, N, H], got shape {getattr(x, 'shape', None)}")
    B, T, N, H = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: k {k.shape}, v {v.shape}")
    if k.shape[0] != B or k.shape[2] != N or k.shape[3] != H:
        raise ValueError(
            f"q [B, T, N, H] = {q.shape} and k [B, S, N, H] = {k.shape} disagree on B, N or H")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
    return B, T, N, H


def check_sinks(sinks, N: int):
    if sinks is None:
        return None
    sinks = jnp.asarray(sinks)
    if sinks.shape != (N,):
        raise ValueError(f"sinks must have shape [N] = ({N},), got {sinks.shape}")
    return sinks.astype(jnp.float32)


def infer_batch(T: int, **masks) -> int:
    """Batch size implied by per-example arguments (1 when all broadcast)."""
    B = 1
    for name, m in masks.items():
        if m is None:
            continue
        b = np.shape(m)[0] if np.ndim(m) >= 1 else 1
        if b != 1:
            if B not in (1, b):
                raise ValueError(f"batch sizes disagree: {name} has {b}, another argument {B}")
            B = b
    return B


def check_token_mask(m, B: int, T: int, name: str, *, default: bool):
    """A ``[B, T]`` (or ``[1, T]``) boolean token mask, broadcast to [B, T]."""
    if m is None:
        return jnp.full((B, T), default)
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
        raise ValueError(f"{name} must be boolean, got dtype {m.dtype}")
    if m.ndim != 2 or m.shape[1] != T or m.shape[0] not in (1, B):
        raise ValueError(f"{name} must have shape [B, T] = {(B, T)}, got {m.shape}")
    return jnp.broadcast_to(m, (B, T))


def check_random_blocks(rb, block_size: Optional[int], B: int, N: Optional[int], T: int):
    """Checks a ``[B or 1, N or 1, ceil(T/block_size), r]`` int index array."""
    if block_size is None:
        raise ValueError("random_blocks requires block_size")
    bs = check_positive_int(block_size, "block_size")
    if bs > T:
        raise ValueError(f"block_size={bs} is larger than the sequence length T={T}")
    rb = jnp.asarray(rb)
    if not jnp.issubdtype(rb.dtype, jnp.integer):
        raise ValueError(f"random_blocks must be integer, got dtype {rb.dtype}")
    nb = -(-T // bs)
    if rb.ndim != 4 or rb.shape[2] != nb or rb.shape[0] not in (1, B) or (
            N is not None and rb.shape[1] not in (1, N)):
        want = f"[B or 1, N or 1, ceil(T / block_size), r] = [{B} or 1, {N if N is not None else 'N'} or 1, {nb}, r]"
        raise ValueError(f"random_blocks must have shape {want} (T={T}, block_size={bs}), got {rb.shape}")
    if is_concrete(rb) and rb.size:
        host = np.asarray(rb)  # numpy: jnp ops on a constant would be staged under jit
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= nb:
            raise ValueError(
                f"random_blocks indices must lie in [0, {nb}) (T={T}, block_size={bs}); "
                f"got min {lo}, max {hi}")
    return rb.astype(jnp.int32)


def check_global_qkv(global_qkv, q_shape) -> None:
    """Longformer's (q_g, k_g, v_g): three arrays shaped like q."""
    if global_qkv is None:
        return
    if len(global_qkv) != 3:
        raise ValueError(f"global_qkv must be (q_g, k_g, v_g), got {len(global_qkv)} items")
    for name, x in zip(("q_g", "k_g", "v_g"), global_qkv):
        if x.shape != q_shape:
            raise ValueError(f"global_qkv {name} must have shape {q_shape}, got {x.shape}")


def _host_mask(m, B: int, T: int) -> Optional[np.ndarray]:
    """A token mask as numpy ``[B, T]`` when it has a value now (None = all True)."""
    if m is None:
        return np.ones((B, T), bool)
    if not is_concrete(m):
        return None
    return np.broadcast_to(np.asarray(m, bool), (B, T))


def resolve_globals(global_mask, pad, B: int, T: int, max_globals, padding_mask=None):
    """The effective global mask (padding removed) and the static capacity G.

    Returns ``(glob [B, T] bool or None, G)``. ``pad`` is the checked padding
    mask, ``padding_mask`` the caller's argument. When the global mask has a
    value now -- outside jit, or a constant closed over under jit -- its
    per-example counts are checked against ``max_globals`` (ValueError naming
    the counts) and, with no ``max_globals``, G is the largest count (counted
    on real tokens when the padding mask has a value too, else an upper
    bound). When the global mask is traced, ``max_globals`` is required.
    """
    if global_mask is None:
        if max_globals is not None:
            check_nonneg_int(max_globals, "max_globals")
        return None, 0
    glob = check_token_mask(global_mask, B, T, "global_mask", default=False) & pad
    host_glob = _host_mask(global_mask, B, T)
    host_pad = _host_mask(padding_mask, B, T)
    counts = None if host_glob is None else [
        int(c) for c in (host_glob if host_pad is None else host_glob & host_pad).sum(-1)]
    if max_globals is None:
        if counts is None:
            raise ValueError("max_globals (a static int) is required when global_mask is "
                             "traced (e.g. an argument of a jitted function)")
        return glob, max(counts, default=0)
    G = check_nonneg_int(max_globals, "max_globals")
    if counts is not None and host_pad is not None and max(counts, default=0) > G:
        over = {b: c for b, c in enumerate(counts) if c > G}
        raise ValueError(f"more global tokens than max_globals={G}: per-example counts "
                         f"{over} (example index: count)")
    return glob, G
