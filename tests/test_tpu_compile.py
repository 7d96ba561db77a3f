"""implementation='pallas_tpu' compiled ahead of time for TPU topologies, from this CPU host.

Needs libtpu (``pip install -r requirements-tpu.txt``); every test skips with
that reason when it is absent. Each compiles forward + backward inside
``jax.shard_map`` (the Mosaic call cannot be auto-partitioned) and checks that
the program holds Mosaic custom calls and fits the chip's HBM.
Run: ``python -m pytest -q tests/test_tpu_compile.py`` (3-10 min with libtpu, by load).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import globalattn as ga
from experiments import compile as aot
from globalattn.kernels import pallas_tpu as pt

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: AOT only

pytestmark = pytest.mark.skipif(not aot.libtpu_available(), reason=aot.LIBTPU_MISSING)


def _attention_step(mesh, *, T, N=4, H=64, G=64, window=128, causal=False, random=False,
                    gqkv=False, sinks=False, explicit_shard_map=True):
    """value_and_grad of a loss through the kernel, lowered for ``mesh`` (batch over 'data')."""
    B = mesh.shape["data"]
    bs = 128
    nb = -(-T // bs)

    def attn(q, k, v, glob, pad, rb, qg, s):
        return ga.global_local_attention(
            q, k, v, local_window_size=(window, window // 2), global_mask=glob, padding_mask=pad,
            max_globals=G, is_causal=causal, random_blocks=rb if random else None,
            block_size=bs if random else None, global_qkv=(qg, qg, qg) if gqkv else None,
            sinks=s if sinks else None, implementation="pallas_tpu")

    spec = (P("data"),) * 7 + (P(),)
    f = jax.shard_map(attn, mesh=mesh, in_specs=spec, out_specs=P("data")) if explicit_shard_map \
        else attn

    def loss(q, k, v, glob, pad, rb, qg, s):
        return jnp.sum(f(q, k, v, glob, pad, rb, qg, s).astype(jnp.float32) ** 2)

    data = NamedSharding(mesh, P("data"))
    x = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=data)
    m = jax.ShapeDtypeStruct((B, T), jnp.bool_, sharding=data)
    rb = jax.ShapeDtypeStruct((B, N, nb, 2), jnp.int32, sharding=data)
    s = jax.ShapeDtypeStruct((N,), jnp.float32, sharding=NamedSharding(mesh, P()))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 6, 7)))
    with pt.compile_for_tpu(), jax.set_mesh(mesh):
        lowered = step.lower(x, x, x, m, m, rb, x, s)
    return lowered


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_fwd_bwd_compiles_to_mosaic_and_fits(topology):
    topo = aot.tpu_topology(topology)
    mesh = aot.topology_mesh(topo, {"data": len(topo.devices)})
    lowered = _attention_step(mesh, T=4096)
    assert lowered.as_text().count("tpu_custom_call") >= 5  # fwd, dq, dk/dv per pass
    report = aot.memory_report(lowered.compile(), aot.chip_of(topo))
    assert report["fits"], report
    assert report["temp_bytes"] < 2**30, report


def test_every_feature_compiles_on_v5e():
    topo = aot.tpu_topology("v5e:2x2")
    mesh = aot.topology_mesh(topo, {"data": 4})
    lowered = _attention_step(mesh, T=2048, causal=True, random=True, gqkv=True, sinks=True)
    assert lowered.as_text().count("tpu_custom_call") >= 5
    assert aot.memory_report(lowered.compile(), aot.chip_of(topo))["fits"]


def test_auto_sharded_caller_gets_a_shard_map():
    # Under jax.set_mesh with Auto axes (how the training step runs) the kernel
    # wraps itself in shard_map; batch split over 'data'.
    topo = aot.tpu_topology("v5e:2x2")
    mesh = aot.topology_mesh(topo, {"data": 4})
    lowered = _attention_step(mesh, T=1024, explicit_shard_map=False)
    compiled = lowered.compile()
    assert lowered.as_text().count("tpu_custom_call") >= 5
    report = aot.memory_report(compiled, aot.chip_of(topo))
    assert report["fits"], report


def test_compile_cli_prints_the_report(capsys):
    # The training step of a real config, its mesh over the topology's devices.
    # (a quick config whose mesh takes every device; the table configs pin 1 device for CPU runs)
    status = aot.main(["compile", "--config=configs/mqar.py:quick", "--topology=v5e:2x2"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "per-chip HBM" in out and "fits" in out and "Mosaic calls" in out
    assert "(0 Mosaic calls)" not in out  # 'auto' compiles what a TPU picks: the kernel
