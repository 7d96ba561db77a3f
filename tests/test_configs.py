"""Experiment configs: every file loads, locks, validates; bad overrides fail clearly."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import ablate
from experiments import compile as aot

from globalattn.train import config as config_lib
from globalattn.train.config import apply_overrides, load_config, sweep_configs, validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]
NAMES = [os.path.splitext(os.path.basename(f))[0] for f in CONFIG_FILES]


def _cfg(name: str, arg: str = "test") -> ml_collections.ConfigDict:
    return load_config(os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


def _is_train_config(name: str) -> bool:
    """Configs for train_and_evaluate have every base_config field; others (e.g. a
    reproduction script's own schema) are only checked for the shared conventions."""
    return set(config_lib.base_config().keys()) <= set(_cfg(name).keys())


TRAIN_NAMES = [n for n in NAMES if _is_train_config(n)]


def test_required_config_files_exist():
    assert {"long_range", "listops", "mqar", "span_qa"} <= set(TRAIN_NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("arg", ["", "quick", "test"])
def test_every_config_file_loads_locked(name, arg):
    c = _cfg(name, arg)
    assert c.is_locked
    with pytest.raises(AttributeError):
        c.no_such_field = 1


@pytest.mark.parametrize("name", TRAIN_NAMES)
@pytest.mark.parametrize("arg", ["", "quick", "test"])
def test_train_config_is_valid(name, arg):
    c = _cfg(name, arg)
    spec = validate_config(c, device_count=1, process_count=1)
    assert spec.model_config.max_len >= spec.seq_len
    if arg == "":  # the full config must also fit an 8-device data-parallel run
        validate_config(c, device_count=8, process_count=1)


@pytest.mark.parametrize("name", NAMES)
def test_docstring_has_run_command_and_sweep_applies(name):
    module = config_lib.load_config_module(os.path.join(ROOT, "configs", f"{name}.py"))
    assert "python -m experiments." in module.__doc__
    if name in TRAIN_NAMES:
        assert f"--config=configs/{name}.py" in module.__doc__
    runs = config_lib.call_sweep(module, None)
    ablation = getattr(module, "ablation", None)  # experiments/ablate.py's axes
    assert runs or ablation, f"configs/{name}.py has neither sweep() nor ablation()"
    for arg in ("test", None) if ablation is not None else ():
        cfg = module.get_config(arg)
        for axes in ablate.config_axes(module, arg):
            for data_config in axes["data_configs"]:
                spec = validate_config(apply_overrides(cfg, {"data.config": data_config}),
                                       device_count=1, process_count=1)
                assert max(axes["num_active_globals"]) <= spec.capacity, (arg, data_config)
    for run_name, cfg in sweep_configs(module.get_config("test"), runs):
        assert run_name
        if name in TRAIN_NAMES:
            validate_config(cfg, device_count=1, process_count=1)


def test_unknown_arg_rejected():
    with pytest.raises(ValueError, match="unknown config arg 'bogus'.*quick"):
        _cfg("long_range", "bogus")


def test_typo_override_suggests_the_field():
    c = _cfg("long_range")
    with pytest.raises(KeyError, match='did you mean "window"'):
        apply_overrides(c, {"model.windw": 3})
    with pytest.raises(KeyError, match='did you mean "optim"'):
        apply_overrides(c, {"optimm.learning_rate": 3})
    with pytest.raises(AttributeError):  # the locked config itself rejects new fields
        c.model.windw = 3


def test_wrong_type_override_rejected():
    c = _cfg("long_range")
    with pytest.raises(TypeError, match="model.window"):
        apply_overrides(c, {"model.window": "wide"})
    with pytest.raises(TypeError, match="batch_size"):
        apply_overrides(c, {"batch_size": 2.5})
    with pytest.raises(TypeError):  # placeholders keep their type: int or None
        apply_overrides(c, {"eval_batch_size": "8"})
    # Ints widen to floats; that is not an error.
    assert apply_overrides(c, {"optim.learning_rate": 1}).optim.learning_rate == 1.0


def test_overrides_do_not_mutate_the_original():
    c = _cfg("long_range")
    apply_overrides(c, {"model.window": 3})
    assert c.model.window == 2


def _errors(c, **kw) -> str:
    with pytest.raises(ValueError) as info:
        validate_config(c, **{"device_count": 1, "process_count": 1, **kw})
    return str(info.value)


@pytest.mark.parametrize("overrides, device_count, expected", [
    ({"model.window": 31}, 1, "model.window=31 >= T-1=31"),
    ({"num_active_globals": 2}, 1, "num_active_globals=2 outside [0, capacity G=1]"),
    ({"batch_size": 12, "mesh.data": -1}, 8,
     "batch_size=12 is not divisible by the 8 data-parallel devices"),
    ({"eval_batch_size": 4, "mesh.data": 8}, 8, "eval_batch_size=4 is not divisible by the 8"),
    ({"mesh.data": 16}, 8, "needs 16 devices but there are only 8"),
    ({"mesh.model": 3, "mesh.data": -1}, 8, "the fixed axes use 3 devices, which does not divide"),
    ({"mesh.fsdp": 4, "mesh.data": 2, "batch_size": 12}, 8,
     "batch_size=12 is not divisible by the 8 data-parallel devices"),
    ({"mesh.fsdp": 3, "mesh.data": 1, "batch_size": 6, "eval_batch_size": 6}, 3,
     "model.d_model=16 is not divisible by mesh.fsdp=3"),
    ({"mesh.data": 0}, 1, "mesh axis 'data' must be -1 or a positive int, got 0"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "are all -1"),
    ({"logical_axis_rules": (("embed", "fsdp"), ("embed", None))}, 1,
     "logical_axis_rules: logical axes ['embed'] appear in more than one rule"),
    ({"model.head": "token"}, 1, "model.head='token' does not fit task 'long_range_retrieval'"),
    ({"model.vocab_size": 10}, 1, "model.vocab_size=10 < the vocabulary"),
    ({"model.max_len": 16}, 1, "model.max_len=16 < sequence length T=32"),
    ({"model.num_classes": 3}, 1, "model.num_classes=3 but long_range_retrieval has 8 classes"),
    ({"optim.warmup_steps": 10}, 1, "optim.warmup_steps=10 > num_train_steps=3"),
    ({"data.eval_splits": ("dev",)}, 1, "data.eval_splits ['dev'] not in the splits"),
    ({"data.config": "t65"}, 1, "has no config 't65'"),
    ({"model.strategy.name": "task"}, 1, "strategy 'task' needs question segments"),
    ({"model.strategy.name": "first", "model.strategy.num_globals": 40}, 1,
     "num_globals=40 > sequence length T=32"),
    ({"model.strategy.name": "sideways"}, 1, "name='sideways' not in"),
    ({"optim.grad_clip_norm": -1.0}, 1, "grad_clip_norm must be >= 0"),
    ({"seed": -1}, 1, "seed must be an int in [0, 2**32)"),
    ({"model.arch": "perceiver", "model.rope": True}, 1,
     "arch='perceiver' does not support rope=True"),
])
def test_cross_field_errors_name_the_values(overrides, device_count, expected):
    c = apply_overrides(_cfg("long_range"), overrides)
    assert expected in _errors(c, device_count=device_count)


def test_all_errors_are_reported_together():
    c = apply_overrides(_cfg("long_range"), {"model.window": 40, "batch_size": 12,
                                             "optim.warmup_steps": 10, "mesh.data": -1})
    msg = _errors(c, device_count=8)
    assert "model.window=40" in msg and "batch_size=12" in msg and "warmup_steps=10" in msg


def test_task_specific_errors():
    mqar = apply_overrides(_cfg("mqar"), {"data.prepend_cls": True})
    assert "data.prepend_cls=True but task 'mqar' has no CLS token" in _errors(mqar)
    span = apply_overrides(_cfg("span_qa"), {"model.strategy.num_globals": 2})
    assert "num_globals=2 < question length 3" in _errors(span)
    heads = apply_overrides(_cfg("listops"), {"model.num_heads": 3, "model.d_model": 48,
                                              "mesh.model": 2, "mesh.data": -1, "batch_size": 8})
    assert "model.num_heads=3 is not divisible by mesh.model=2" in _errors(heads, device_count=2)


def test_derived_fields_follow_the_data_config():
    spec = validate_config(apply_overrides(_cfg("long_range", ""), {"data.config": "t128"}),
                           device_count=1, process_count=1)
    assert (spec.seq_len, spec.model_config.max_len, spec.model_config.num_classes) == (128, 128, 16)
    listops = validate_config(_cfg("listops"), device_count=1, process_count=1)
    assert listops.seq_len == 65  # 64 + the prepended CLS


def test_cli_rejects_typos_and_wrong_types_with_status_2(tmp_path):
    # Real processes: absl flags are process-global, so each case gets its own (in parallel).
    workdir = tmp_path / "never_written"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    cases = {
        "typo": (["--config.model.windw=3"],
                 'unknown config field \'windw\'\nDid you mean "window"'),
        "type": (["--config.model.window=abc"],
                 "--config.model.window=abc: invalid literal for int()"),
        "cross": (["--config.model.window=40"], "model.window=40 >= T-1=31"),
    }
    procs = {}
    for name, (extra, _) in cases.items():
        argv = [sys.executable, "-m", "experiments.train", "--config=configs/long_range.py:test"]
        argv += [f"--workdir={workdir}"] + extra
        procs[name] = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, err)
        assert cases[name][1] in err, (name, err)
        assert "Traceback" not in err, (name, err)
    assert not workdir.exists()  # nothing ran


def test_compile_cli_takes_overrides_in_process_and_runs_twice(capsys, monkeypatch):
    # Its flags are per call: --config.x overrides are found in the argv given (not only
    # in sys.argv), and a second call in the same process defines no flag twice.
    seen = []

    def compile_train_step(config, topology, attention):  # stands in for libtpu's compile
        seen.append((config.model.d_model, config.batch_size, topology, attention))
        raise ValueError("stop here")

    monkeypatch.setattr(aot, "libtpu_available", lambda: True)
    monkeypatch.setattr(aot, "compile_train_step", compile_train_step)
    base = ["compile", "--config=configs/mqar.py:quick", "--topology=v5e:2x2"]
    assert aot.main(base + ["--config.model.d_model=128"]) == 2
    assert aot.main(base + ["--config.batch_size=16", "--attention=xla"]) == 2
    assert "error: stop here" in capsys.readouterr().err
    default = config_lib.load_config("configs/mqar.py:quick")
    assert seen == [(128, default.batch_size, "v5e:2x2", "auto"),
                    (default.model.d_model, 16, "v5e:2x2", "xla")]
    with pytest.raises(SystemExit) as exit_:
        aot.main(base + ["--config.model.num_layrs=2"])
    assert exit_.value.code == 2
    assert "error: unknown config field 'num_layrs'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "main", "ablate"])
def test_training_clis_take_overrides_in_process_and_run_twice(command, capsys, monkeypatch):
    # Like compile: flags per call, so --config.x overrides are found in the argv given
    # (pytest's sys.argv holds none of them) and a second call defines no flag twice.
    import importlib

    module = importlib.import_module(f"experiments.{command}")
    seen = []

    def stop(config, *rest, **kw):  # stands in for training: record the config and stop
        seen.append(config.model.d_model if hasattr(config, "model") else config)
        raise ValueError("invalid config: stop here")

    name = "run_ablations" if command == "ablate" else "train_and_evaluate"
    monkeypatch.setattr(module, name, stop)
    config = {"train": "configs/mqar.py:quick", "main": "configs/mqar.py:quick",
              "ablate": "configs/global_count.py:test"}[command]
    for d_model in (48, 80):
        argv = [command, f"--config={config}", "--workdir=/tmp/unused_cli",
                f"--config.model.d_model={d_model}"]
        with pytest.raises((SystemExit, ValueError)):
            module.main(argv)
    assert seen == [48, 80]
    with pytest.raises(SystemExit) as exit_:
        module.main([command, f"--config={config}", "--workdir=/tmp/unused_cli",
                     "--config.model.num_layrs=2"])
    assert exit_.value.code == 2
    assert "error: unknown config field 'num_layrs'" in capsys.readouterr().err
