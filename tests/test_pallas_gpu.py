"""``implementation='pallas_gpu'`` against the dense oracle, forward and backward.

On this CPU the kernels run in Pallas interpret mode: every grid program of
the very kernel bodies that run on a GPU. Tiles are 16 wide (the smallest
Triton dot), so sequences of up to 70 tokens span several tiles of every kind:
window edge tiles and interior (unmasked) tiles, global-key tiles, random-key
tiles, and several key spans of the global rows.

Tolerances, as for the XLA path: float32 max abs error <= 1e-5 forward and
<= 2e-5 for gradients (q, k, v, sinks, global_qkv) on unit-scale inputs;
bfloat16 inputs against the float32 oracle on the same bf16-rounded inputs:
<= 2e-2 forward, <= 5e-2 gradients.

An interpret-mode program takes ~10-30 s to compile on a CPU, so the default
suite compiles a few fixed-shape programs (masks, globals, padding, random
indices and sinks are traced inputs) and runs many data cases through each.
The full hypothesis set over shapes (the XLA path's cases) is marked slow:

    python -m pytest -q -m slow tests/test_pallas_gpu.py
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import globalattn as ga
from globalattn.kernels import pallas_gpu as pg

F32_FWD, F32_BWD = 1e-5, 2e-5
BF16_FWD, BF16_BWD = 2e-2, 5e-2
SMALL = pg.BlockConfig(16, 16, 16, 16, 16, 16, split=2)


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything that fixes a compiled program."""

    B: int
    T: int
    N: int
    H: int
    window: object
    causal: bool
    globals_: bool
    random: Optional[Tuple[int, int, int, int]]  # (rb batch, rb heads, block_size, r)
    sinks: bool
    gqkv: bool
    dtype: str = "float32"
    config: pg.BlockConfig = SMALL


def _kwargs(s: Static, glob, pad, rb, sinks):
    return dict(local_window_size=s.window, global_mask=glob if s.globals_ else None,
                padding_mask=pad, is_causal=s.causal,
                random_blocks=rb if s.random else None,
                block_size=s.random[2] if s.random else None,
                sinks=sinks if s.sinks else None)


def _pallas(s: Static, q, k, v, gqkv, sinks, glob, pad, rb):
    return pg.attention(q, k, v, **_kwargs(s, glob, pad, rb, sinks),
                        max_globals=s.T if s.globals_ else None,
                        global_qkv=gqkv if s.gqkv else None, config=s.config)


def _oracle(s: Static, q, k, v, gqkv, sinks, glob, pad, rb):
    return ga.global_local_reference(q, k, v, **_kwargs(s, glob, pad, rb, sinks),
                                     global_qkv=gqkv if s.gqkv else None)


@functools.lru_cache(maxsize=None)
def _program(s: Static, which: str):
    """Jitted (data) -> (out, grads w.r.t. q, k, v, global_qkv, sinks)."""
    fn = _pallas if which == "pallas" else _oracle
    up = which == "oracle" and s.dtype == "bfloat16"  # oracle in f32 on the rounded inputs

    @jax.jit
    def run(q, k, v, gqkv, sinks, glob, pad, rb, cot):
        if up:
            q, k, v, gqkv, cot = jax.tree.map(lambda x: x.astype(jnp.float32), (q, k, v, gqkv, cot))
        out, vjp = jax.vjp(lambda *a: fn(s, *a, glob, pad, rb), q, k, v, gqkv, sinks)
        return out, vjp(cot.astype(out.dtype))
    return run


def _data(s: Static, rs: np.random.Generator, *, glob_kind="many", pad_kind="right",
          rb_kind="random"):
    B, T, N, H = s.B, s.T, s.N, s.H
    dt = jnp.dtype(s.dtype)
    shape = (B, T, N, H)
    q, k, v, cot = (jnp.asarray(rs.standard_normal(shape), dt) for _ in range(4))
    gqkv = tuple(jnp.asarray(rs.standard_normal(shape), dt) for _ in range(3))
    sinks = jnp.asarray(rs.standard_normal(N), jnp.float32)
    glob = {"none": np.zeros((B, T), bool), "all": np.ones((B, T), bool),
            "one": np.eye(T, dtype=bool)[rs.integers(0, T, B)],
            "many": rs.random((B, T)) < 0.2}[glob_kind]
    if pad_kind == "none":
        pad = np.ones((B, T), bool)
    else:
        lengths = rs.integers(0, T + 1, B)
        lengths[0] = 0 if B > 1 else lengths[0]  # an all-padding example
        pad = np.arange(T)[None] < lengths[:, None]
        if pad_kind == "left":
            pad = pad[:, ::-1].copy()
    rb = None
    if s.random:
        rbB, rbN, bs, r = s.random
        nb = -(-T // bs)
        rb = rs.integers(0, nb, (rbB, rbN, nb, r))  # repeats allowed: a pair counts once
        if rb_kind == "out_of_range":  # under jit these select nothing
            rb = np.where(rs.random(rb.shape) < 0.5, rb, rs.choice([-1, nb, 10 * nb], rb.shape))
        rb = jnp.asarray(rb, jnp.int32)
    return (q, k, v, gqkv, sinks, jnp.asarray(glob), jnp.asarray(pad), rb, cot)


def _assert_close_finite(a, b, tol, what):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        assert np.all(np.isfinite(x)), f"{what}: non-finite values in the Pallas result"
        assert np.all(np.isfinite(y)), f"{what}: non-finite values in the oracle result"
        np.testing.assert_allclose(x, y, atol=tol, rtol=0, err_msg=what)


def _check(s: Static, data, what: str):
    fwd_tol, bwd_tol = (F32_FWD, F32_BWD) if s.dtype == "float32" else (BF16_FWD, BF16_BWD)
    out_p, g_p = _program(s, "pallas")(*data)
    out_o, g_o = _program(s, "oracle")(*data)
    assert out_p.dtype == jnp.dtype(s.dtype)
    _assert_close_finite(out_p, out_o, fwd_tol, f"{what}: forward")
    _assert_close_finite(g_p, g_o, bwd_tol, f"{what}: vjp")
    pad = np.asarray(data[6])
    assert np.all(np.asarray(out_p)[~pad] == 0), f"{what}: padded rows must be exactly 0"
    return out_p, g_p


def _poison(data):
    """NaN written into every masked (padding) slot of q, k, v and global_qkv."""
    q, k, v, gqkv, sinks, glob, pad, rb, cot = data
    bad = ~pad[:, :, None, None]
    p = lambda x: jnp.where(bad, jnp.nan, x)  # noqa: E731
    return (p(q), p(k), p(v), tuple(p(x) for x in gqkv), sinks, glob, pad, rb, cot)


# Windows chosen so that tiles of 16 have both masked edge tiles and unmasked
# interior tiles, forward (query blocks) and backward (key blocks).
EVERYTHING = Static(B=2, T=70, N=2, H=8, window=(35, 18), causal=False, globals_=True,
                    random=(2, 2, 7, 2), sinks=True, gqkv=True)
CAUSAL = Static(B=2, T=61, N=2, H=8, window=(40, 9), causal=True, globals_=True,
                random=(1, 1, 5, 3), sinks=False, gqkv=False)


@pytest.mark.parametrize("s", [EVERYTHING, CAUSAL], ids=["window+globals+random+sinks+gqkv",
                                                        "causal"])
def test_fixed_shape_matches_oracle_and_nan_never_leaks(s):
    rs = np.random.default_rng(0)
    cases = [dict(), dict(glob_kind="none", pad_kind="none"),
             dict(glob_kind="all", pad_kind="left", rb_kind="out_of_range"),
             dict(glob_kind="one", pad_kind="none", rb_kind="out_of_range")]
    for kind in cases:
        data = _data(s, rs, **kind)
        out, grads = _check(s, data, str(kind))
        if not np.all(np.asarray(data[6])):
            # Padding slots (globals flagged there too) hold NaN: nothing changes.
            out_n, grads_n = _program(s, "pallas")(*_poison(data))
            _assert_close_finite(out_n, out, 0.0, f"{kind}: forward with NaN in masked slots")
            _assert_close_finite(grads_n, grads, 0.0, f"{kind}: vjp with NaN in masked slots")


def test_public_api_dispatches_to_pallas_gpu():
    rs = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rs.standard_normal((1, 12, 1, 8)), jnp.float32) for _ in range(3))
    kw = dict(local_window_size=(3, 1), sinks=jnp.asarray([0.5]))
    got = jax.jit(lambda q, k, v: ga.global_local_attention(
        q, k, v, **kw, implementation="pallas_gpu"))(q, k, v)
    want = jax.jit(lambda q, k, v: ga.global_local_reference(q, k, v, **kw))(q, k, v)
    _assert_close_finite(got, want, F32_FWD, "public API")
    with pytest.raises(ValueError, match=r"block_q tunes the 'xla' implementation only"):
        ga.global_local_attention(q, k, v, **kw, block_q=16, implementation="pallas_gpu")


@pytest.mark.parametrize("kw,match", [
    (dict(block_q=24), r"BlockConfig.block_q must be a power of two >= 16, got 24"),
    (dict(block_k=8), r"BlockConfig.block_k must be a power of two >= 16, got 8"),
    (dict(split=0), r"BlockConfig.split must be a positive int, got 0"),
])
def test_block_config_errors_name_the_values(kw, match):
    with pytest.raises(ValueError, match=match):
        pg.BlockConfig(**kw)


def test_attention_rejects_unknown_arguments():
    q = jnp.ones((1, 8, 1, 4))
    with pytest.raises(ValueError, match=r"unknown arguments \['block_q'\]"):
        pg.attention(q, q, q, local_window_size=1, block_q=16)


def _cuda_target():
    """The GPU the Triton lowering targets when no GPU is attached.

    jax 0.10 assumes compute capability 9.0; jax >= 0.11 asks for an abstract
    device (an H200 here, compute capability 9.0 too).
    """
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="cuda")
    return jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


def _export(fn, *shapes):
    return jax.export.export(
        jax.jit(fn), platforms=("cuda",),
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*shapes)


@pytest.mark.parametrize("vmapped", [False, True], ids=["plain", "vmapped"])
def test_lowers_for_cuda_forward_and_backward(monkeypatch, vmapped):
    """Exports fwd+bwd for CUDA from this CPU: every kernel lowers to Triton IR that verifies.

    Also under jax.vmap (K training runs in one program, as the ablation tool
    does), which adds a grid axis to every kernel. PTX compilation happens in
    XLA on a GPU; that is the device check's job.
    """
    from jax._src.pallas.triton import lowering as triton_lowering
    lower, verified = triton_lowering.lower_jaxpr_to_triton_module, []

    def lower_and_verify(*a, **kw):
        result = lower(*a, **kw)
        verified.append(result.module.operation.verify())
        return result
    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
    B, T, N, H = 1, 300, 2, 64
    s = Static(B=B, T=T, N=N, H=H, window=(40, 30), causal=True, globals_=True,
               random=(B, N, 32, 2), sinks=True, gqkv=True, dtype="bfloat16",
               config=pg.BlockConfig())

    def loss(q, k, v, gqkv, sinks, glob, pad, rb):
        out = pg.attention(q, k, v, **_kwargs(s, glob, pad, rb, sinks), max_globals=8,
                           global_qkv=gqkv, interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    K = (3,) if vmapped else ()  # vmapped: 3 variants of every input
    S = lambda shape, dt: jax.ShapeDtypeStruct(K + shape, dt)  # noqa: E731
    x = S((B, T, N, H), jnp.bfloat16)
    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))
    with _cuda_target():
        exp = _export(jax.vmap(fn) if vmapped else fn,
                      x, x, x, (x, x, x), S((N,), jnp.float32), S((B, T), bool), S((B, T), bool),
                      S((B, N, -(-T // 32), 2), jnp.int32))
    text = exp.mlir_module()
    calls = re.findall(r'stablehlo\.custom_call @__gpu\$xla\.gpu\.triton\(.*?name = "(\w+)"', text)
    assert sorted(calls) == sorted([
        "globalattn_local_fwd", "globalattn_rows_fwd",  # forward
        "globalattn_local_dq", "globalattn_local_dkv", "globalattn_global_column_dkv",
        "globalattn_random_dkv", "globalattn_rows_dq", "globalattn_rows_dkv",  # backward
    ]), calls
    assert verified == [True] * 8


@pytest.mark.slow
@pytest.mark.parametrize("H", [64, 128])
def test_compiles_to_sm90_cubin(monkeypatch, tmp_path, H):
    """Every kernel's Triton IR compiles to an sm_90 cubin (H100/H200) on this CPU.

    Needs the ``triton`` package (with its bundled ptxas; not a project
    requirement) whose IR parser accepts this jaxlib's Triton IR; skipped
    without it. The shared memory each kernel asks for must fit one
    Hopper block (227 KiB). Slow (about a minute per head dim):

        pip install triton && python -m pytest -q -m slow tests/test_pallas_gpu.py -k sm90
    """
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from jax._src.pallas.triton import lowering as triton_lowering
    lower, irs = triton_lowering.lower_jaxpr_to_triton_module, []

    def lower_and_keep(*a, **kw):
        result = lower(*a, **kw)
        irs.append(result.module.operation.get_asm(enable_debug_info=False))
        return result
    monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_keep)
    B, T, N = 1, 4096, 2048 // H

    def loss(q, k, v, glob, rb, sinks):
        out = pg.attention(q, k, v, local_window_size=(512, 0), is_causal=True, global_mask=glob,
                           max_globals=64, random_blocks=rb, block_size=64, sinks=sinks,
                           interpret=False)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
    with _cuda_target():
        text = _export(jax.grad(loss, argnums=(0, 1, 2, 5)), x, x, x,
                       jax.ShapeDtypeStruct((B, T), bool),
                       jax.ShapeDtypeStruct((B, N, T // 64, 2), jnp.int32),
                       jax.ShapeDtypeStruct((N,), jnp.float32)).mlir_module()
    params = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(
        r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', text)}
    assert len(irs) == len(params) == 8, sorted(params)
    for ir in irs:
        name = re.search(r"module @(\w+)", ir).group(1)
        stages, warps = params[name]
        path = tmp_path / f"{name}.ttir"
        path.write_text(ir)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=warps, num_stages=stages))
        assert kernel.asm["cubin"], name
        assert kernel.metadata.shared <= 227 * 1024, (name, kernel.metadata.shared)


# ---------------------------------------------------------------------------
# The full hypothesis set (slow): shapes vary, one compile per example.
# ---------------------------------------------------------------------------
@st.composite
def statics(draw, dtype="float32"):
    B = draw(st.integers(1, 2))
    T = draw(st.integers(1, 70))
    N = draw(st.integers(1, 3))
    H = draw(st.sampled_from([4, 8]))
    kind = draw(st.sampled_from(["sym", "asym", "zero", "huge", "wide"]))
    window = {"sym": draw(st.integers(0, 12)), "zero": (0, 0), "huge": T + draw(st.integers(0, 5)),
              "asym": (draw(st.integers(0, 12)), draw(st.integers(0, 12))),
              "wide": (draw(st.integers(16, 40)), draw(st.integers(16, 40)))}[kind]
    random = None
    if draw(st.booleans()):
        bs = draw(st.integers(1, max(1, min(T, 9))))
        r = draw(st.integers(1, min(3, -(-T // bs))))
        random = (draw(st.sampled_from([1, B])), draw(st.sampled_from([1, N])), bs, r)
    globals_ = draw(st.booleans())
    return Static(B, T, N, H, window, draw(st.booleans()), globals_, random, draw(st.booleans()),
                  globals_ and draw(st.booleans()), dtype,
                  draw(st.sampled_from([SMALL, pg.BlockConfig(32, 16, 16, 32, 16, 16, split=1)])))


@st.composite
def data_kinds(draw):
    return dict(glob_kind=draw(st.sampled_from(["none", "one", "many", "all"])),
                pad_kind=draw(st.sampled_from(["none", "right", "left"])),
                rb_kind=draw(st.sampled_from(["random", "out_of_range"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def _run_case(s, kind, *, nan=False):
    kind = dict(kind)
    data = _data(s, np.random.default_rng(kind.pop("seed")), **kind)
    out, grads = _check(s, data, f"{s} {kind}")
    if nan and not np.all(np.asarray(data[6])):
        out_n, grads_n = _program(s, "pallas")(*_poison(data))
        _assert_close_finite(out_n, out, 0.0, "forward with NaN in masked slots")
        _assert_close_finite(grads_n, grads, 0.0, "vjp with NaN in masked slots")
    _program.cache_clear()  # one example's programs are not reused


@pytest.mark.slow
@settings(max_examples=12)
@given(statics(), data_kinds())
def test_matches_oracle_float32(s, kind):
    _run_case(s, kind, nan=True)


@pytest.mark.slow
@settings(max_examples=6)
@given(statics("bfloat16"), data_kinds())
def test_matches_oracle_bfloat16(s, kind):
    _run_case(s, kind)


@pytest.mark.slow
def test_long_sequence_default_tiles_matches_oracle():
    s = Static(B=1, T=333, N=2, H=16, window=(40, 25), causal=False, globals_=True,
               random=(1, 2, 32, 2), sinks=True, gqkv=False, config=pg.BlockConfig(split=1))
    _check(s, _data(s, np.random.default_rng(3)), "T=333, default tiles")


@pytest.mark.slow
def test_vmap_over_variants_matches_oracle():
    """jax.vmap over K variants (as the ablation tool trains them), forward and vjp."""
    s = dataclasses.replace(CAUSAL, B=1, T=40)
    rs = np.random.default_rng(5)
    cases = [_data(s, rs) for _ in range(3)]
    batched = jax.tree.map(lambda *x: jnp.stack(x), *cases)
    out_p, g_p = jax.vmap(_program(s, "pallas"))(*batched)
    out_o, g_o = jax.vmap(_program(s, "oracle"))(*batched)
    _assert_close_finite(out_p, out_o, F32_FWD, "vmapped forward")
    _assert_close_finite(g_p, g_o, F32_BWD, "vmapped vjp")
