"""Sharded training on 8 simulated CPU devices gives the one-device losses.

Data parallel, FSDP (parameters split along 'embed' over 'fsdp'), head/MLP
tensor parallel ('model') and their combination run the same tiny model for 3
steps; losses must agree with a 1-device mesh to rtol 1e-5. Parameters must be
born sharded (shape-first init), and a checkpoint written on 8 devices must
restore onto a 4-device mesh with explicit target shardings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec

import sharded_worker as W
from globalattn import sharding
from globalattn.train import distributed
from globalattn.train.state import batch_sharding, state_shardings

HERE = os.path.dirname(os.path.abspath(__file__))
RTOL = 1e-5


@pytest.fixture(scope="module")
def reference_losses():
    losses, _ = W.train({"data": 1}, 3)
    assert np.all(np.isfinite(losses))
    return losses


@pytest.mark.parametrize("mesh_shape", [
    {"data": 8},                            # data parallel
    {"data": 2, "fsdp": 4},                 # FSDP
    {"data": 2, "model": 4},                # head (tensor) parallel
    # All three at once: one more compile, so only in the slow suite.
    pytest.param({"data": 2, "fsdp": 2, "model": 2}, marks=pytest.mark.slow),
], ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_sharded_losses_match_one_device(mesh_shape, reference_losses):
    losses, state = W.train(mesh_shape, 3)
    np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)
    assert np.all(np.isfinite(losses))
    # Params stay where the rules put them (out_shardings of the donated step).
    _, _, shardings, _, _ = W.build(mesh_shape)
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert x.sharding == s


def test_params_are_born_sharded():
    mesh_shape = {"data": 2, "fsdp": 2, "model": 2}  # init only: no train-step compile
    mesh, abstract, shardings, init, _ = W.build(mesh_shape)
    with jax.set_mesh(mesh):
        state = init(jax.random.key(0))
    qkv = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
           if "query" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p)]
    assert qkv
    q = qkv[0]  # [D, N, H] = (embed, heads, kv) -> ('fsdp', 'model', None)
    assert q.sharding.spec == PartitionSpec("fsdp", "model", None)
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2, q.shape[2])
    # Adam moments follow their parameter.
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert x.sharding == s
    # The abstract state (restore target) carries the same shardings, no data.
    assert all(isinstance(a, jax.ShapeDtypeStruct) and a.sharding == s
               for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


def test_rules_are_restricted_to_the_mesh():
    mesh = sharding.make_mesh({"data": 4, "model": 2})
    rules = dict(sharding.logical_axis_rules(mesh))
    assert rules["batch"] == "data" and rules["embed"] is None and rules["heads"] == "model"
    assert sharding.batch_sharding(mesh).spec == PartitionSpec("data")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    assert sharding.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert sharding.data_parallel_size(mesh) == 8
    custom = (("batch", "data"), ("embed", None))  # plain data parallel on this mesh
    assert sharding.batch_sharding(mesh, custom).spec == PartitionSpec("data")
    with pytest.raises(ValueError, match="more than one rule"):
        sharding.rules_from_config((("embed", "fsdp"), ("embed", None)))
    with pytest.raises(ValueError, match="mesh axis name"):
        sharding.rules_from_config((("embed", 3),))


@pytest.mark.parametrize("mesh, devices, want", [
    ({"data": -1, "fsdp": 2, "model": 1}, 8, {"data": 4, "fsdp": 2, "model": 1}),
    ({"data": 2, "model": 2}, 8, {"data": 2, "model": 2}),  # a smaller mesh is allowed
    ({"data": -1, "fsdp": -1}, 8, "all -1"),
    ({"data": -1, "model": 3}, 8, "does not divide the 8 devices"),
    ({"data": 4, "fsdp": 4}, 8, "needs 16 devices but there are only 8"),
    ({"data": 0}, 8, "must be -1 or a positive int, got 0"),
])
def test_resolve_mesh_shape(mesh, devices, want):
    if isinstance(want, dict):
        assert sharding.resolve_mesh_shape(mesh, devices) == want
    else:
        with pytest.raises(ValueError, match=want):
            sharding.resolve_mesh_shape(mesh, devices)


def test_parameters_that_do_not_divide_are_an_error():
    model, tx = W.model_and_optimizer()  # 4 heads
    mesh = sharding.make_mesh({"model": 8})
    with pytest.raises(ValueError, match=r"query.*dim 4 not divisible by model=8"):
        state_shardings(model, tx, W.T, mesh)


def test_global_batch_checks_sizes():
    mesh = sharding.make_mesh({"data": 8})
    rows = W.batch_rows(0, slice(0, 6))
    with pytest.raises(ValueError, match="6 rows is not divisible by the data-parallel size 8"):
        distributed.global_batch(rows, batch_sharding(mesh))
    with pytest.raises(ValueError, match="global batch size is 16"):
        distributed.global_batch(W.batch_rows(0, slice(0, 8)), batch_sharding(mesh), 16)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        distributed.process_batch_slice(8, 0, 3)
    assert distributed.process_batch_slice(8, 1, 2) == slice(4, 8)


def test_checkpoint_from_8_devices_restores_onto_4(tmp_path):
    """Save on data2 x fsdp4 (8 devices); restore onto fsdp2 x model2 (4 devices) here
    (placement) and in a separate 4-device process (placement and the next losses)."""
    src = {"data": 2, "fsdp": 4}  # compiled already by the loss test
    _, state = W.train(src, 2)
    path = str(tmp_path / "ckpt")
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, state)
    ckpt.wait_until_finished()

    dst = {"fsdp": 2, "model": 2}
    _, abstract, shardings, _, _ = W.build(dst)
    restored = ckpt.restore(path, abstract)  # explicit target: ShapeDtypeStruct(sharding=...)
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding == s and len(x.sharding.device_set) == 4
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    expected, _ = W.train(src, 2, state, first_step=2)  # donates state: last use

    out = tmp_path / "restore.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_worker.py"), "restore", "--mesh",
         "fsdp=2,model=2", "--devices", "4", "--steps", "2", "--ckpt", path, "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["device_count"] == 4 and res["placed"]
    np.testing.assert_allclose(res["next_losses"], expected, rtol=RTOL)


def test_distributed_settings_come_from_the_config_then_the_environment():
    from globalattn.train import base_config

    env = {"GLOBALATTN_COORDINATOR": "envhost:1", "GLOBALATTN_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1", "GLOBALATTN_LOCAL_DEVICE_IDS": "2,3"}
    cfg = base_config().distributed  # every field None: the environment decides
    assert distributed._settings(cfg.to_dict(), env) == {
        "coordinator_address": "envhost:1", "num_processes": 2, "process_id": 1,
        "local_device_ids": [2, 3]}
    cfg.coordinator_address, cfg.num_processes, cfg.process_id = "cfghost:2", 4, 3
    cfg.local_device_ids = (0,)
    assert distributed._settings(cfg.to_dict(), env) == {
        "coordinator_address": "cfghost:2", "num_processes": 4, "process_id": 3,
        "local_device_ids": [0]}
    # One machine, nothing configured: nothing to connect.
    assert distributed.initialize(base_config().distributed.to_dict(), env={}) is False
    with pytest.raises(ValueError, match=r"process_id=4 outside \[0, num_processes=4\)"):
        distributed._settings({**cfg.to_dict(), "process_id": 4}, {})
    with pytest.raises(ValueError, match="needs num_processes"):
        distributed._settings({"coordinator_address": "h:1"}, {})
    with pytest.raises(ValueError, match=r"unknown distributed settings \['num_hosts'\]"):
        distributed._settings({"num_hosts": 2}, {})
