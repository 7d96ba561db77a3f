"""Compile a config's training step for a TPU topology on this (CPU) host, before paying for the pod.

    python -m experiments.compile --config=configs/mqar.py --topology=v5e:4x4 \\
        [--config.model.window=512 ...] [--attention=auto|xla|pallas_tpu]

Needs libtpu (``pip install -r requirements-tpu.txt``); runs with
``JAX_PLATFORMS=cpu`` and never touches a TPU. The step is the one
:func:`globalattn.train.make_train_step` builds, with the config's mesh,
logical-axis rules and shardings over the topology's (abstract) devices.
Prints per-chip HBM (arguments, outputs, temporaries, total vs the chip's
capacity), the XLA cost model's FLOPs and bytes (it cannot see inside a Mosaic
call: kernels report their own estimates) and the compile time. Exit status 1
if the program does not fit, 2 for a bad config or topology.

``--attention=auto`` (default) compiles what a TPU run picks
(``'pallas_tpu'``); ``xla`` compiles the pure-JAX path for comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import sys
import time
from typing import Any, Dict, Mapping

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: compile only
# Compiling needs no chip: let several processes load libtpu (tests, benchmarks) at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

LIBTPU_MISSING = ("libtpu is not installed (pip install -r requirements-tpu.txt): "
                  "TPU programs cannot be compiled on this host")


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (one JAX device; v5p/v4 in megacore mode)."""

    name: str
    hbm_gib: float  # HBM capacity
    hbm_gbps: float  # HBM bandwidth, GB/s
    bf16_tflops: float  # peak dense bf16 matmul


CHIPS = {
    "TPU v5 lite": Chip("v5e", 16, 819, 197),
    "TPU v5": Chip("v5p", 95, 2765, 459),
    "TPU v6 lite": Chip("v6e", 32, 1640, 918),
    "TPU v4": Chip("v4", 32, 1200, 275),
}


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_topology(name: str):
    """``jax.experimental.topologies`` description of e.g. ``'v5e:4x4'`` (abstract devices).

    Raises ValueError naming the topology when libtpu rejects it.
    """
    if not libtpu_available():
        raise RuntimeError(LIBTPU_MISSING)
    from jax.experimental import topologies

    try:
        dims = [int(d) for d in name.split(":")[1].split("x")]
    except (IndexError, ValueError):
        raise ValueError(f"--topology must look like 'v5e:4x4' or 'v5p:2x2x1', got {name!r}") from None
    bounds = tuple(min(2, d) for d in dims) + (1,) * (3 - len(dims))
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                            chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=1)
    except Exception as err:  # libtpu's error types are not public
        raise ValueError(f"topology {name!r} rejected by libtpu: {err}") from None


def topology_mesh(topo, shape: Mapping[str, int]):
    """A Mesh with Auto axes ``shape`` (``{name: size}``, product = device count) over ``topo``."""
    from jax.experimental import topologies

    n = len(topo.devices)
    if int(np.prod(list(shape.values()))) != n:
        raise ValueError(f"mesh {dict(shape)} needs {int(np.prod(list(shape.values())))} devices; "
                         f"the topology has {n}")
    mesh = topologies.make_mesh(topo, tuple(shape.values()), tuple(shape.keys()))
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def chip_of(topo) -> Chip:
    kind = topo.devices[0].device_kind
    if kind not in CHIPS:
        raise ValueError(f"no chip figures for device kind {kind!r}; known: {sorted(CHIPS)}")
    return CHIPS[kind]


def memory_report(compiled, chip: Chip) -> Dict[str, Any]:
    """Per-device HBM of a compiled program against the chip's capacity."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    capacity = int(chip.hbm_gib * 2**30)
    return dict(chip=chip.name, argument_bytes=m.argument_size_in_bytes,
                output_bytes=m.output_size_in_bytes, alias_bytes=m.alias_size_in_bytes,
                temp_bytes=m.temp_size_in_bytes, code_bytes=m.generated_code_size_in_bytes,
                total_bytes=total, capacity_bytes=capacity, fits=total <= capacity)


def cost_report(compiled) -> Dict[str, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(flops=float(cost.get("flops", 0.0)),
                bytes_accessed=float(cost.get("bytes accessed", 0.0)))


def compile_train_step(config, topology: str, attention: str = "auto") -> Dict[str, Any]:
    """Lowers and compiles ``config``'s train step for ``topology``; returns the report."""
    from globalattn.kernels.pallas_tpu import compile_for_tpu
    from globalattn.modules import build_model
    from globalattn.sharding import batch_sharding
    from globalattn.train import (learning_rate_schedule, make_optimizer, make_train_step,
                                  state_shardings, validate_config)
    from globalattn.train import inputs

    if attention not in ("auto", "xla", "pallas_tpu"):
        raise ValueError(f"--attention must be auto, xla or pallas_tpu, got {attention!r}")
    topo = tpu_topology(topology)
    chip = chip_of(topo)
    spec = validate_config(config, device_count=len(topo.devices), process_count=1)
    mesh = topology_mesh(topo, spec.mesh_shape)
    model_config = spec.model_config
    model = build_model(model_config)
    tx = make_optimizer(config.optim, config.num_train_steps)
    abstract_state, shardings = state_shardings(model, tx, spec.seq_len, mesh, spec.rules)
    step = make_train_step(
        model, tx, spec.meta.kind, mesh=mesh, state_shardings=shardings,
        schedule=learning_rate_schedule(config.optim, config.num_train_steps),
        num_active_globals=config.num_active_globals, rules=spec.rules)
    bsh = batch_sharding(mesh, spec.rules)
    template = inputs.empty_batch(spec.meta.kind, config.batch_size, spec.seq_len)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in template.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    t0 = time.perf_counter()
    # 'auto' must pick what a TPU picks; 'xla' is what this CPU host picks anyway.
    tpu_kernels = attention != "xla"
    with (compile_for_tpu() if tpu_kernels else contextlib.nullcontext()), jax.set_mesh(mesh):
        lowered = step.jitted.lower(abstract_state, batch, rng)
    compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    report = dict(topology=topology, devices=len(topo.devices), mesh=dict(spec.mesh_shape),
                  attention="pallas_tpu" if tpu_kernels else "xla",
                  mosaic_calls=lowered.as_text().count("tpu_custom_call"),
                  compile_seconds=seconds, **memory_report(compiled, chip),
                  **cost_report(compiled))
    return report


def format_report(r: Mapping[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
    lines = [
        f"topology {r['topology']} ({r['devices']} devices, chip {r['chip']}), mesh {r['mesh']}, "
        f"attention {r['attention']} ({r['mosaic_calls']} Mosaic calls)",
        f"  per-chip HBM: arguments {gib(r['argument_bytes'])}  outputs {gib(r['output_bytes'])}"
        f"  (aliased {gib(r['alias_bytes'])})",
        f"                temporaries {gib(r['temp_bytes'])}  code {gib(r['code_bytes'])}",
        f"                total {gib(r['total_bytes'])} of {gib(r['capacity_bytes'])}: "
        f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
        f"  cost model (per device, Mosaic calls by their own estimate): "
        f"{r['flops'] / 1e12:.3f} TFLOP, {r['bytes_accessed'] / 2**30:.3f} GiB accessed",
        f"  compile time {r['compile_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    from absl import flags

    from globalattn.train.cli import config_flag_values, parse_flags

    # Flags of this call only (not absl's global FLAGS): main() can run more than once in a
    # process, and ml_collections looks for the --config.x overrides in this argv.
    argv = list(sys.argv if argv is None else argv)
    fv, config_flag = config_flag_values(
        argv, None, "Experiment config file, e.g. configs/long_range.py[:quick].")
    topology = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4 or v5p:2x2x1.",
                                   flag_values=fv)
    attention = flags.DEFINE_string("attention", "auto", "auto (what a TPU picks), xla, pallas_tpu.",
                                    flag_values=fv)
    parse_flags(argv, required=("config", "topology"), usage=__doc__, flag_values=fv)
    if not libtpu_available():
        print(f"error: {LIBTPU_MISSING}", file=sys.stderr)
        return 2
    try:
        report = compile_train_step(config_flag.value, topology.value, attention.value)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
