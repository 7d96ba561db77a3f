"""A tiny model trained a few steps on a given mesh: shared by the sharding tests.

Imported by tests/test_sharded_training.py and tests/test_multihost.py, and run
as a subprocess (one per process, or with another device count)::

    python tests/sharded_worker.py train --mesh data=2,fsdp=2 --steps 3 --out losses.json \
        [--coordinator localhost:PORT --num-processes 2 --process-id 0] [--devices 2]
    python tests/sharded_worker.py save|restore --mesh ... --ckpt DIR --out result.json

The data are a deterministic function of the global row index, and each process
builds only its own rows (its slice of every global batch).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any

import numpy as np

B, T, V, C = 8, 16, 32, 4  # global batch, length, vocabulary, classes


def _setup_env(devices: int | None) -> None:
    if devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_and_optimizer():
    """A 1-layer encoder (4 heads, D=16) and AdamW; dropout off (exact comparisons)."""
    import ml_collections

    from globalattn.modules import build_model, default_model_config
    from globalattn.train.optim import make_optimizer

    m = default_model_config()
    m.unlock()
    m.update(dict(vocab_size=V, max_len=T, d_model=16, num_heads=4, mlp_dim=32, num_layers=1,
                  dropout=0.0, window=2, num_classes=C))
    m.lock()
    optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, warmup_steps=0, end_learning_rate_factor=1.0, weight_decay=0.01,
        b1=0.9, b2=0.98, eps=1e-8, grad_clip_norm=1.0))
    return build_model(m), make_optimizer(optim, 10)


def batch_rows(step: int, rows: slice) -> dict[str, np.ndarray]:
    """Rows ``rows`` of global batch ``step`` (every process computes only its own)."""
    idx = np.arange(B)[rows]
    out: dict[str, list] = {k: [] for k in ("tokens", "padding_mask", "segment_ids", "label",
                                             "weights")}
    for i in idx:
        r = np.random.RandomState(1000 * step + int(i))
        n = r.randint(T // 2, T + 1)
        out["tokens"].append(r.randint(1, V, T).astype(np.int32))
        out["padding_mask"].append(np.arange(T) < n)
        out["segment_ids"].append(np.zeros(T, np.int32))
        out["label"].append(np.int32(r.randint(C)))
        out["weights"].append(np.float32(1.0))
    return {k: np.stack(v) for k, v in out.items()}


def parse_mesh(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}


def build(mesh_shape: dict[str, int]):
    """``(mesh, abstract_state, shardings, init, train_step)`` on ``mesh_shape`` (cached,
    so every test on one mesh shares one compiled step)."""
    return _build(tuple(mesh_shape.items()))


@functools.lru_cache(maxsize=None)
def _build(mesh_items: tuple[tuple[str, int], ...]):
    mesh_shape = dict(mesh_items)
    import optax

    from globalattn import sharding
    from globalattn.train.state import make_init_fn, state_shardings
    from globalattn.train.step import make_train_step

    model, tx = model_and_optimizer()
    mesh = sharding.make_mesh(mesh_shape)
    abstract, shardings = state_shardings(model, tx, T, mesh)
    init = make_init_fn(model, tx, T, shardings)
    step = make_train_step(model, tx, "classification", mesh=mesh, state_shardings=shardings,
                           schedule=optax.constant_schedule(1e-2))
    return mesh, abstract, shardings, init, step


def train(mesh_shape: dict[str, int], steps: int, state: Any = None, first_step: int = 0
          ) -> tuple[list[float], Any]:
    """Losses of ``steps`` train steps (from a fresh state unless ``state`` is given)."""
    import jax

    from globalattn.train import distributed
    from globalattn.train.state import batch_sharding

    mesh, _, _, init, train_step = build(mesh_shape)
    if state is None:
        with jax.set_mesh(mesh):
            state = init(jax.random.key(0))
    rows = distributed.process_batch_slice(B)
    losses = []
    for s in range(first_step, first_step + steps):
        batch = distributed.global_batch(batch_rows(s, rows), batch_sharding(mesh), B)
        state, metrics = train_step(state, batch, jax.random.key(1))
        losses.append(float(metrics["loss"]))
    return losses, state


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=("train", "save", "restore"))
    p.add_argument("--mesh", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt")
    p.add_argument("--devices", type=int)
    p.add_argument("--coordinator")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    a = p.parse_args(argv)
    _setup_env(a.devices)
    import globalattn  # noqa: F401  (XLA workaround before any array)
    import jax

    from globalattn.train import distributed

    if a.coordinator:
        distributed.initialize({"coordinator_address": a.coordinator,
                                "num_processes": a.num_processes, "process_id": a.process_id},
                               initialization_timeout=60)
    mesh_shape = parse_mesh(a.mesh)
    rows = distributed.process_batch_slice(B)
    result: dict[str, Any] = {"process_count": jax.process_count(),
                              "device_count": jax.device_count(),
                              "local_device_count": jax.local_device_count(),
                              "rows": [rows.start, rows.stop]}  # what this process read
    if a.action == "train":
        result["losses"], _ = train(mesh_shape, a.steps)
    else:
        import orbax.checkpoint as ocp

        ckpt = ocp.StandardCheckpointer()
        if a.action == "save":
            result["losses"], state = train(mesh_shape, a.steps)
            ckpt.save(os.path.abspath(a.ckpt), state)
            ckpt.wait_until_finished()
            result["next_losses"], _ = train(mesh_shape, 2, state, first_step=a.steps)
        else:
            _, abstract, shardings, _, _ = build(mesh_shape)
            state = ckpt.restore(os.path.abspath(a.ckpt), abstract)  # target shardings
            result["placed"] = all(x.sharding == s for x, s in zip(
                jax.tree.leaves(state), jax.tree.leaves(shardings)))
            result["next_losses"], _ = train(mesh_shape, 2, state, first_step=a.steps)
    out = a.out if jax.process_count() == 1 else f"{a.out}.{jax.process_index()}"
    with open(out, "w") as f:
        json.dump(result, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
