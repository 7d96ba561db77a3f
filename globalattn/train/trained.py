"""A finished run, loaded back: ``load_run(workdir) -> (config, model, params)``.

Any model trained by :func:`globalattn.train.train_and_evaluate` (encoders,
Perceiver, the causal LM) is read the same way: the experiment config from
``<workdir>/config.json`` and the parameters of the newest verified checkpoint
in ``<workdir>/checkpoints/`` (the same format a resumed run restores).
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from globalattn import sharding as sharding_lib
from globalattn.modules import build_model
from globalattn.train.checkpoint import Checkpointer, state_signature
from globalattn.train.config import validate_config
from globalattn.train.optim import make_optimizer
from globalattn.train.state import state_shardings

__all__ = ["load_run"]


def _tuples(x: Any) -> Any:
    """JSON lists back to the tuples the config schema holds."""
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def load_run(workdir: str) -> tuple[ml_collections.ConfigDict, Any, Any]:
    """``(config, model, params)`` of the run in ``workdir``; params on the default device.

    Raises:
      FileNotFoundError: ``workdir`` holds no config.json or no checkpoint.
    """
    config_path = os.path.join(workdir, "config.json")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isfile(config_path) or not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir} holds no trained run (expected config.json and "
                                "checkpoints/ written by train_and_evaluate)")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(_tuples(json.load(f)))
    # The run's mesh may be larger than this machine: restore onto one device.
    config.mesh = ml_collections.ConfigDict({k: 1 for k in config.mesh.keys()})
    spec = validate_config(config)
    model = build_model(spec.model_config)
    tx = make_optimizer(config.optim, config.num_train_steps)
    mesh = sharding_lib.make_mesh(spec.mesh_shape)
    abstract_state, _ = state_shardings(model, tx, spec.seq_len, mesh, spec.rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    key_shape = jax.random.key_data(jax.random.key(0)).shape
    abstract = {"train_state": abstract_state,
                "rng": jax.ShapeDtypeStruct(key_shape, np.uint32, sharding=replicated)}
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.checkpoint.max_to_keep, async_save=False,
                        writable=False)  # loading only: read-only storage is fine
    try:
        restored = ckpt.restore_latest(abstract, None, state_signature(abstract))
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint")
    params = restored[1]["train_state"].params
    # Uncommitted arrays, like freshly initialised ones: a jitted decode step then sees one
    # placement for params, cache and tokens and compiles once.
    return config, model, jax.device_put(jax.device_get(params))
