"""Multi-process (multi-host) setup and process-local -> global batches.

One process per host (TPU VM, GPU node) or per GPU; every process runs the
same program. :func:`initialize` connects them (``jax.distributed.initialize``)
and must run before anything touches a JAX device. Afterwards
``jax.devices()`` lists every device of every process and a mesh spans them
all; each process reads only its own slice of every global batch
(:func:`process_batch_slice`, or grain's ``ShardByJaxProcess``) and
:func:`global_batch` assembles the slices into one global ``jax.Array`` with
``jax.make_array_from_process_local_data`` (no process ever holds the whole batch).

Settings, first found wins (all optional):

* arguments / ``config.distributed`` fields ``coordinator_address``,
  ``num_processes``, ``process_id``, ``local_device_ids``;
* environment: ``GLOBALATTN_COORDINATOR`` (``host:port`` of process 0),
  ``GLOBALATTN_NUM_PROCESSES``, ``GLOBALATTN_PROCESS_ID``,
  ``GLOBALATTN_LOCAL_DEVICE_IDS`` (comma-separated), or JAX's own
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``;
* nothing: in a SLURM or Open MPI job with several tasks, or when
  ``TPU_WORKER_HOSTNAMES`` lists several TPU hosts, ``jax.distributed.initialize()``
  detects the cluster itself; ``GLOBALATTN_DISTRIBUTED=1`` forces that
  auto-detection (e.g. on a TPU pod slice whose hosts are only known from the
  TPU metadata server); anywhere else (one machine) nothing is initialized and
  the run is single-process (``GLOBALATTN_DISTRIBUTED=0`` forces that).

On CPU the cross-process collectives need an implementation; jax 0.10's
default ``jax_cpu_collectives_implementation`` is ``gloo`` (``cpu_collectives=``
selects another, e.g. ``mpi``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

__all__ = ["cluster_detected", "global_batch", "initialize", "process_batch_slice",
           "shutdown"]

_ENV = {"coordinator_address": ("GLOBALATTN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
        "num_processes": ("GLOBALATTN_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
        "process_id": ("GLOBALATTN_PROCESS_ID", "JAX_PROCESS_ID"),
        "local_device_ids": ("GLOBALATTN_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS")}


def _from_env(field: str, env: Mapping[str, str]) -> str | None:
    for name in _ENV[field]:
        if env.get(name):
            return env[name]
    return None


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment looks like a multi-process job JAX can detect by itself."""
    env = os.environ if env is None else env
    if env.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:  # multi-host TPU slice
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def _settings(settings: Mapping[str, Any] | None, env: Mapping[str, str]) -> dict[str, Any]:
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(_ENV) - {"cpu_collectives"})
    if unknown:
        raise ValueError(f"unknown distributed settings {unknown}; known: {sorted(_ENV)}")
    out: dict[str, Any] = {}
    for field in _ENV:
        value = settings.get(field)
        out[field] = value if value is not None else _from_env(field, env)
    for field in ("num_processes", "process_id"):
        if out[field] is not None:
            try:
                out[field] = int(out[field])
            except (TypeError, ValueError):
                raise ValueError(f"{field} must be an int, got {out[field]!r}") from None
    ids = out["local_device_ids"]
    if isinstance(ids, str):
        ids = [int(i) for i in ids.split(",") if i.strip()]
    out["local_device_ids"] = None if ids is None else [int(i) for i in ids]
    n, pid = out["num_processes"], out["process_id"]
    if n is not None and n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if n is not None and pid is not None and not 0 <= pid < n:
        raise ValueError(f"process_id={pid} outside [0, num_processes={n})")
    if out["coordinator_address"] and (n is None or pid is None):
        raise ValueError(f"coordinator_address={out['coordinator_address']!r} needs "
                         f"num_processes (got {n}) and process_id (got {pid}) too")
    return out


def initialize(settings: Mapping[str, Any] | None = None, *,
               env: Mapping[str, str] | None = None, cpu_collectives: str | None = None,
               initialization_timeout: int = 300) -> bool:
    """Connects this process to the others; returns whether it runs multi-process.

    Args:
      settings: ``config.distributed`` or a dict (see the module docstring); None
        reads the environment only.
      env: environment to read (default ``os.environ``).
      cpu_collectives: CPU cross-process collectives ('gloo' or 'mpi'); None
        keeps ``jax_cpu_collectives_implementation`` (default 'gloo').
      initialization_timeout: seconds to wait for every process to connect.

    Call it first, before any JAX computation (it fails once a backend exists).
    Idempotent: a second call returns without doing anything.

    Raises:
      ValueError: inconsistent settings, naming the values.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    s = _settings(settings, env)
    force = env.get("GLOBALATTN_DISTRIBUTED", "")
    if force not in ("", "0", "1"):
        raise ValueError(f"GLOBALATTN_DISTRIBUTED must be 0 or 1, got {force!r}")
    if force == "0" or (force != "1" and not s["coordinator_address"]
                        and not cluster_detected(env)):
        return False  # one process: nothing to connect
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=s["coordinator_address"], num_processes=s["num_processes"],
        process_id=s["process_id"], local_device_ids=s["local_device_ids"],
        initialization_timeout=initialization_timeout)
    return jax.process_count() > 1


def process_batch_slice(global_batch_size: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """The rows of a global batch this process reads (contiguous, in process order).

    Raises:
      ValueError: ``global_batch_size`` not divisible by the process count.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} processes")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding,
                 global_batch_size: int | None = None) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global ``jax.Array``s split as ``sharding`` says.

    Every process passes its own ``B / process_count`` rows (the same count on
    every process); the result has ``B`` rows and never exists on one host.

    Raises:
      ValueError: leaves with different row counts, or a global batch that does
        not divide over the sharding's batch axes (naming the sizes).
    """
    rows = {k: np.shape(v)[0] for k, v in local.items()}
    if len(set(rows.values())) != 1:
        raise ValueError(f"batch leaves have different numbers of rows: {rows}")
    n_local = next(iter(rows.values()))
    total = n_local * jax.process_count()
    if global_batch_size is not None and global_batch_size != total:
        raise ValueError(f"{n_local} rows per process x {jax.process_count()} processes = "
                         f"{total}, but the global batch size is {global_batch_size}")
    spec = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    ways = int(np.prod([sharding.mesh.shape[a] for a in axes])) if axes else 1
    if total % ways:
        raise ValueError(f"global batch of {total} rows is not divisible by the data-parallel "
                         f"size {ways} (mesh axes {axes} of {dict(sharding.mesh.shape)})")
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def shutdown() -> None:
    """Disconnects (at exit of a multi-process run; safe to call when not initialized)."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()

