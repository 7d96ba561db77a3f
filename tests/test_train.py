"""Training: one step per config, exact resume, non-finite policy, checkpoint verification.

Runs on the tiny data configs (generated once per session into a tmp data dir)
and the ':test' variant of each config file (tiny model, a few steps).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from globalattn.train import (Checkpointer, NonFiniteError, apply_overrides, base_config,
                              evaluate, fingerprint, load_config, read_jsonl, train_and_evaluate,
                              validate_config)
from globalattn.train import inputs, loop
from globalattn.train.checkpoint import state_signature
from globalattn.train.state import batch_sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_config_names() -> list[str]:
    """configs/*.py run by train_and_evaluate (they carry every base_config field)."""
    names = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name != "__init__" and set(base_config().keys()) <= set(load_config(path + ":test")):
            names.append(name)
    return names


CONFIGS = _train_config_names()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


def _config(name: str, data_dir: str, **overrides):
    c = load_config(os.path.join(ROOT, "configs", f"{name}.py:test"))
    return apply_overrides(c, {"data.data_dir": data_dir, **overrides})


def _train_records(workdir: str) -> list[dict]:
    return [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]


# ---------------------------------------------------------------------------------------
# End to end.


def test_all_required_configs_are_trained():
    assert {"long_range", "listops", "mqar", "span_qa"} <= set(CONFIGS)


# Fine-tuning configs load a pretrained checkpoint; their training runs are in
# tests/test_pretrained_finetune.py (-m slow), which keeps the default suite short.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n.startswith("finetune_") else n for n in CONFIGS])
def test_one_step_on_tiny_real_data(name, data_dir, tmp_path):
    config = _config(name, data_dir, num_train_steps=1, tensorboard=name == "long_range")
    result = train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 1 and not result["preempted"]
    # The whole tiny split (50 examples; the char-LM's 16 chunks).
    assert result["validation/num_examples"] == validate_config(config).split_sizes["validation"]
    assert np.isfinite(result["validation/loss"])
    (record,) = _train_records(str(tmp_path))
    assert record["step"] == 1 and np.isfinite(record["loss"]) and record["skipped_steps"] == 0
    assert os.path.isdir(tmp_path / "checkpoints" / "1")
    if name == "long_range":
        assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


# Dropout on, so a resumed run must also reproduce the per-step random keys; all (8
# simulated) devices, so exact resume is checked under data parallelism.
_RESUME = {"model.dropout": 0.1, "checkpoint.every_steps": 2, "optim.warmup_steps": 2,
           "mesh.data": -1}


def test_resume_after_preemption_is_bitwise_identical(data_dir, tmp_path):
    config = _config("long_range", data_dir, num_train_steps=6, **_RESUME)
    full = train_and_evaluate(config, str(tmp_path / "full"))

    def preempt_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends

    broken = str(tmp_path / "broken")
    first = train_and_evaluate(config, broken, step_callback=preempt_at_3)
    assert first["preempted"] and 3 <= first["step"] < 6
    assert os.path.isdir(os.path.join(broken, "checkpoints", str(first["step"])))
    assert "validation/accuracy" not in first  # no final eval when preempted
    resumed = train_and_evaluate(config, broken)  # a new call: fresh model, iterator, jit
    assert resumed["step"] == 6 and not resumed["preempted"]

    a, b = _train_records(str(tmp_path / "full")), _train_records(broken)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["batch_hash"] == rb["batch_hash"], ra["step"]
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"], ra["step"]
    assert resumed["fingerprint"] == full["fingerprint"]  # final params, bit for bit
    assert resumed["validation/accuracy"] == full["validation/accuracy"]
    # Fresh and restored states have one type: three runs, one compiled train step.
    program = loop._program(config, validate_config(config))
    assert program.train_step.num_traces() == 1


@pytest.mark.slow
def test_sigterm_to_cli_process_saves_and_resumes(data_dir, tmp_path):
    """A real process killed by SIGTERM mid-run exits 0 with a checkpoint, and resumes."""
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "experiments.train", "--config=configs/long_range.py:test",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--config.num_train_steps=400", "--config.checkpoint.every_steps=0"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for line in proc.stdout:
        if "step      5/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    saved = [int(os.path.basename(p)) for p in glob.glob(str(workdir / "checkpoints" / "*"))]
    assert saved and 5 <= max(saved) < 400, out
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in _train_records(str(workdir))] == list(range(1, 401))


def _no_training(step, metrics):
    raise AssertionError(f"step {step} trained despite an unusable checkpoint directory")


def _workdir_files(workdir) -> dict[str, bytes]:
    """Every file of a workdir outside checkpoints/, with its contents."""
    out = {}
    for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
        if os.path.isfile(path) and "checkpoints" not in os.path.relpath(path, workdir):
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


def _splits(workdir) -> list[tuple[int, str]]:
    return [(r["step"], r["split"]) for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_rerunning_a_finished_run_duplicates_nothing(data_dir, tmp_path, capsys):
    config = _config("long_range", data_dir, num_train_steps=2, tensorboard=True)
    workdir = str(tmp_path / "run")
    first = train_and_evaluate(config, workdir)
    # The ETA leaves out compilation: the first (compiling) step is not timed.
    train_lines = [line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("[     train]")]
    assert len(train_lines) == 2 and "steps/s" not in train_lines[0]
    assert "steps/s | ETA 0:00:00 (this run's training)" in train_lines[1]
    records = _train_records(workdir)
    assert "steps_per_sec" not in records[0] and records[1]["steps_per_sec"] > 0
    before = _workdir_files(workdir)
    assert len([f for f in before if "tfevents" in f]) == 1

    # Finished, same config: nothing trained, evaluated or written; the stored result.
    again = train_and_evaluate(config, workdir, step_callback=_no_training)
    assert again == first
    assert _workdir_files(workdir) == before  # no new metrics line, no 2nd events file
    assert "[  finished] step      2/2" in capsys.readouterr().out

    # The final evaluation never completed (no final_metrics.json): it is redone and its
    # records replace the earlier ones.
    os.remove(os.path.join(workdir, "final_metrics.json"))
    redo = train_and_evaluate(config, workdir, step_callback=_no_training)
    assert redo["validation/accuracy"] == first["validation/accuracy"]
    assert _splits(workdir) == [(1, "train"), (2, "train"), (2, "validation")]

    # A changed config (same layout): said so, re-evaluated under it, still no duplicates.
    changed = apply_overrides(config, {"eval_batch_size": 16})
    with pytest.warns(UserWarning, match=r"changed fields: \['eval_batch_size'\]"):
        result = train_and_evaluate(changed, workdir, step_callback=_no_training)
    assert result["validation/num_examples"] == first["validation/num_examples"]
    assert _splits(workdir) == [(1, "train"), (2, "train"), (2, "validation")]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["eval_batch_size"] == 16


def test_rejected_restart_leaves_the_workdir_unchanged(data_dir, tmp_path):
    config = _config("long_range", data_dir, num_train_steps=2)
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    before = _workdir_files(workdir)
    assert "config.json" in before
    wider = apply_overrides(config, {"model.d_model": 32})  # another parameter layout
    with pytest.raises(ValueError, match="holds a state of another layout"):
        train_and_evaluate(wider, workdir, step_callback=_no_training)
    assert _workdir_files(workdir) == before  # config.json still the run's own


# ---------------------------------------------------------------------------------------
# Non-finite policy.


# Poisoned state steps (0-based): one isolated skip, then two in a row.
_POISON = {"nonfinite.inject_at_steps": (1, 3, 4), "nonfinite.max_consecutive": 2}


def _program(config):
    """The loop's compiled program for ``config`` (shared with train_and_evaluate runs)."""
    spec = validate_config(config)
    program = loop._program(config, spec)
    with jax.set_mesh(program.mesh):
        state = program.init(jax.random.key(0))
    return spec, program, state


def _host_copy(tree):
    # np.array copies: a zero-copy view would pin the device buffer and block donation.
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_nonfinite_step_is_skipped_bit_for_bit_and_counted(data_dir):
    config = _config("long_range", data_dir, num_train_steps=8, **_POISON)
    spec, program, state = _program(config)
    it = inputs.make_train_iterator(config)
    sharding = batch_sharding(program.mesh)
    batch = lambda: inputs.to_global(inputs.with_weights(next(it), 8), sharding)  # noqa: E731
    rng = jax.random.key(1)

    state, m0 = program.train_step(state, batch(), rng)
    assert m0["finite"] == 1 and m0["nonfinite_steps"] == 0
    before = _host_copy((state.params, state.opt_state))
    old = state
    state, m1 = program.train_step(state, batch(), rng)  # state step 1: poisoned
    assert all(x.is_deleted() for x in jax.tree.leaves(old))  # the state was donated
    assert m1["finite"] == 0 and not np.isfinite(m1["loss"])
    assert (int(m1["nonfinite_steps"]), int(m1["consecutive_nonfinite"])) == (1, 1)
    after = _host_copy((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # nothing applied
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after[0]))
    assert int(state.step) == 2

    state, m2 = program.train_step(state, batch(), rng)
    assert m2["finite"] == 1
    assert (int(m2["nonfinite_steps"]), int(m2["consecutive_nonfinite"])) == (1, 0)
    assert fingerprint(state.params) != fingerprint(after[0])  # training went on


def test_nonfinite_policy_in_the_loop_skips_counts_then_stops(data_dir, tmp_path):
    config = _config("long_range", data_dir, num_train_steps=8, **_POISON,
                     **{"checkpoint.every_steps": 2})
    with pytest.raises(NonFiniteError, match=r"2 consecutive non-finite steps ending at step 5"
                       r".*the newest checkpoint is step 4 in \S*checkpoints \(") as err:
        train_and_evaluate(config, str(tmp_path))
    assert "clean" not in str(err.value)
    records = {r["step"]: r for r in _train_records(str(tmp_path))}
    assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert [records[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 2]
    assert [records[s]["consecutive_nonfinite"] for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
    assert np.isfinite(records[3]["loss"]) and "loss" not in records[2]
    # The skip counters are part of the checkpointed state.
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints")) == [2, 4]

    # No checkpoint saved before the stop: the message says so instead of naming one.
    never = apply_overrides(config, {"checkpoint.every_steps": 0})  # same compiled program
    with pytest.raises(NonFiniteError, match=r"ending at step 5.*no checkpoint has been saved "
                       r"in \S*never\S*checkpoints: lower"):
        train_and_evaluate(never, str(tmp_path / "never"))
    assert os.listdir(tmp_path / "never" / "checkpoints") == []


# ---------------------------------------------------------------------------------------
# Checkpoints.


def _iterator(n: int = 20) -> grain.DataLoaderIterator:
    sampler = grain.samplers.IndexSampler(n, shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, seed=0, num_epochs=None)
    return iter(grain.DataLoader(data_source=list(range(n)), sampler=sampler,
                                 operations=[grain.transforms.Batch(4)], worker_count=0))


def _payload(scale: float):
    return {"train_state": {"w": jnp.arange(6.0).reshape(2, 3) * scale,
                            "step": jnp.asarray(int(scale), jnp.int32)},
            "rng": jax.random.key_data(jax.random.key(0))}


def test_checkpointer_roundtrip_and_verification(tmp_path):
    it = _iterator()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    sig = state_signature(_payload(1.0))
    for step in (2, 4):
        next(it)
        ckpt.save(step, _payload(float(step)), it, sig)
    ckpt.wait()
    expected_next = next(it)  # what follows the position saved at step 4

    # A partial save (orbax's temporary directory) is not a step; an empty step directory
    # (e.g. a copy cut short) is one, and must be skipped.
    os.makedirs(tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1234")
    os.makedirs(tmp_path / "ckpt" / "6")
    fresh = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    assert fresh.all_steps() == [2, 4, 6]
    it2 = _iterator()
    with pytest.warns(UserWarning, match="skipping checkpoint step 6 .*metadata is unreadable"):
        step, payload = fresh.restore_latest(_payload(1.0), it2, sig)
    assert step == 4 and fresh.all_steps() == [2, 4]
    np.testing.assert_array_equal(payload["train_state"]["w"], _payload(4.0)["train_state"]["w"])
    np.testing.assert_array_equal(next(it2), expected_next)

    # Another state layout (a changed config) is an error, not corruption: nothing moves.
    with pytest.raises(ValueError, match="another layout"):
        fresh.restore_latest(_payload(1.0), _iterator(), "0" * 16)
    assert fresh.all_steps() == [2, 4]

    # Valid orbax data with other values (e.g. a copied-over item) fails the fingerprint.
    other = Checkpointer(str(tmp_path / "other"), max_to_keep=1)
    other.save(4, _payload(9.0), _iterator(), sig)
    other.close()
    shutil.rmtree(tmp_path / "ckpt" / "4" / "state")
    shutil.copytree(tmp_path / "other" / "4" / "state", tmp_path / "ckpt" / "4" / "state")
    with pytest.warns(UserWarning, match=r"skipping checkpoint step 4 .*fingerprint"):
        step, payload = fresh.restore_latest(_payload(1.0), _iterator(), sig)
    assert step == 2
    np.testing.assert_array_equal(payload["train_state"]["w"], _payload(2.0)["train_state"]["w"])
    assert fresh.all_steps() == [2]
    assert len(os.listdir(tmp_path / "corrupt_checkpoints")) == 2

    # Nothing restorable: an error, never a silent restart from scratch.
    shutil.rmtree(tmp_path / "ckpt" / "2" / "meta")
    with pytest.warns(UserWarning, match="skipping checkpoint step 2"), \
            pytest.raises(RuntimeError, match="refusing to restart from scratch"):
        fresh.restore_latest(_payload(1.0), _iterator(), sig)
    fresh.close()
    ckpt.close()


def test_checkpoint_with_an_edited_data_position_is_rejected(tmp_path):
    it = _iterator()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    sig = state_signature(_payload(1.0))
    for step in (2, 4):
        next(it)
        ckpt.save(step, _payload(float(step)), it, sig)
    ckpt.close()
    # Step 4's iterator file set to another valid position (step 2's): the state still
    # matches its fingerprint, but resuming from it would train on other batches.
    data_file = tmp_path / "ckpt" / "4" / "data" / "process_0-of-1.json"
    position = json.loads(data_file.read_text())
    assert position["last_seen_indices"] == {"0": 7}
    position["last_seen_indices"] = {"0": 3}
    data_file.write_text(json.dumps(position))
    fresh = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
    with pytest.warns(UserWarning, match=r"skipping checkpoint step 4 .*data position changed "
                      r"after saving \(data fingerprint [0-9a-f]{16} != saved [0-9a-f]{16}; "
                      r'process 0: last_seen_indices \{"0": 3\} != saved \{"0": 7\}\)'):
        step, payload = fresh.restore_latest(_payload(1.0), _iterator(), sig)
    assert step == 2
    np.testing.assert_array_equal(payload["train_state"]["w"], _payload(2.0)["train_state"]["w"])
    assert fresh.all_steps() == [2]

    # A checkpoint from before data positions were fingerprinted: restored, with a warning.
    meta_file = tmp_path / "ckpt" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["data_fingerprint"], meta["data_position"]
    meta_file.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"step 2 .* written before data positions were "
                      r"fingerprinted: its data position is not verified"):
        step, _ = fresh.restore_latest(_payload(1.0), _iterator(), sig)
    assert step == 2
    fresh.close()


def test_unwritable_checkpoint_directory_fails_before_training(data_dir, tmp_path):
    """A read-only checkpoints/ (as a non-root user; root ignores permissions)."""
    config = _config("long_range", data_dir, num_train_steps=2)
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    ckpt_dir.chmod(0o555)
    try:
        if os.access(ckpt_dir, os.W_OK):
            pytest.skip("this user can write to a read-only directory (root)")
        with pytest.raises(PermissionError, match=f"checkpoint directory {ckpt_dir} is not "
                           "writable"):
            train_and_evaluate(config, str(tmp_path), step_callback=_no_training)
    finally:
        ckpt_dir.chmod(0o755)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]  # no config.json, no metrics


def test_checkpoint_path_under_a_file_fails_before_training(data_dir, tmp_path):
    """What a read-only checkpoints/ does for any user: a checkpoints path that cannot be a
    directory (here a regular file) is an error naming it before any step or write."""
    config = _config("long_range", data_dir, num_train_steps=2)
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(FileExistsError, match=f"checkpoint directory {tmp_path}/checkpoints "
                       "is not writable"):
        train_and_evaluate(config, str(tmp_path), step_callback=_no_training)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_failing_async_save_raises_at_once(tmp_path):
    """A checkpoint directory that becomes unusable after the start fails the next save
    immediately (orbax alone would make save() wait 300 s for its background mkdir)."""
    ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3, async_save=True)
    sig = state_signature(_payload(1.0))
    ckpt.save(1, _payload(1.0), _iterator(), sig)
    ckpt.wait()
    shutil.rmtree(tmp_path / "ckpt")
    (tmp_path / "ckpt").write_text("not a directory")  # no step directory can be made
    outcome = []

    def save():
        try:
            ckpt.save(2, _payload(2.0), _iterator(), sig)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001
            outcome.append(err)

    thread = threading.Thread(target=save, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "save() still waiting after 60 s"
    (err,) = outcome
    assert isinstance(err, OSError) and str(tmp_path / "ckpt") in str(err), err


def test_a_finished_run_loads_from_read_only_storage(data_dir, tmp_path, monkeypatch):
    """load_run only reads: no writability check (a root user cannot chmod-test it, so
    every directory is made to fail the check instead)."""
    from globalattn.train import checkpoint
    from globalattn.train.trained import load_run

    workdir = str(tmp_path / "run")
    train_and_evaluate(_config("long_range", data_dir, num_train_steps=2), workdir)

    def unwritable(directory):
        raise PermissionError(13, f"checkpoint directory {directory} is not writable")

    monkeypatch.setattr(checkpoint, "check_writable", unwritable)
    with pytest.raises(PermissionError, match="is not writable"):
        Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=1)
    config, _, params = load_run(workdir)
    assert config.num_train_steps == 2 and jax.tree.leaves(params)


def _flip_bytes(step_dir: str) -> None:
    """Flips a few bytes in every array data file of a checkpoint's state item."""
    files = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(p)]
    assert files
    for path in files:
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in range(len(data) // 2, len(data), max(len(data) // 8, 1)):
                data[i] ^= 0xFF
            f.seek(0)
            f.write(data)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax futures
def test_corrupt_checkpoint_is_skipped_with_a_warning(data_dir, tmp_path):
    config = _config("long_range", data_dir, num_train_steps=6, **_RESUME)  # compiled already
    workdir = str(tmp_path / "run")
    full = train_and_evaluate(config, workdir)
    _flip_bytes(os.path.join(workdir, "checkpoints", "6"))
    with pytest.warns(UserWarning, match="skipping checkpoint step 6 "):
        result = train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))[0].startswith("6.")
    # Resumed from step 4, the run redid steps 5-6 exactly and saved a good step 6.
    assert result["step"] == 6 and result["fingerprint"] == full["fingerprint"]
    assert [r["step"] for r in _train_records(workdir)] == list(range(1, 7))
    assert sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints"))) == [4, 6]


# ---------------------------------------------------------------------------------------
# Evaluation.


def test_eval_counts_every_example_whatever_the_batch_size(data_dir):
    metrics = []
    for eval_bs in (8, 48):  # 50 examples: last batches hold 2 real rows and 6 / 46 fillers
        # num_train_steps=1: the program compiled by the one-step mqar test.
        config = _config("mqar", data_dir, num_train_steps=1, eval_batch_size=eval_bs)
        spec, program, state = _program(config)
        weights = [b["weights"] for b in inputs.eval_batches(config, spec, "validation")]
        assert sum(w.sum() for w in weights) == 50 and all(len(w) == eval_bs for w in weights)
        metrics.append(evaluate(program.eval_step, state.params, config, spec, "validation",
                                batch_sharding(program.mesh)))
    assert metrics[0]["num_examples"] == metrics[1]["num_examples"] == 50
    for k in ("loss", "accuracy", "sequence_accuracy"):
        np.testing.assert_allclose(metrics[1][k], metrics[0][k], rtol=1e-5)


def _parse_cli(argv: list[str]):
    """The config exactly as ``experiments/train.py`` parses ``--config`` flags."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    # config_flags finds the --config.* overrides in sys.argv, as in a real command line.
    saved, sys.argv = sys.argv, ["train", *argv]
    try:
        fv(sys.argv)
    finally:
        sys.argv = saved
    return fv.config


def test_fsdp_and_axis_rules_are_selected_from_the_command_line(data_dir, tmp_path):
    base = [f"--config={ROOT}/configs/long_range.py:test", f"--config.data.data_dir={data_dir}",
            "--config.num_train_steps=2", "--config.optim.warmup_steps=0"]
    fsdp = _parse_cli(base + ["--config.mesh.data=2", "--config.mesh.fsdp=4"])
    spec = validate_config(fsdp)
    assert spec.mesh_shape == {"data": 2, "fsdp": 4, "model": 1}
    program = loop._program(fsdp, spec)
    param_specs = [s.spec for s in jax.tree.leaves(program.shardings.params)]
    # [embed, ...] matrices are split over fsdp (the default rules), never over 'data'.
    assert any("fsdp" in spec_ for spec_ in param_specs)
    assert not any("data" in spec_ for spec_ in param_specs)
    sharded = train_and_evaluate(fsdp, str(tmp_path / "fsdp"))
    one = train_and_evaluate(apply_overrides(fsdp, {"mesh.data": 1, "mesh.fsdp": 1}),
                             str(tmp_path / "one"))
    np.testing.assert_allclose([r["loss"] for r in _train_records(str(tmp_path / "fsdp"))],
                               [r["loss"] for r in _train_records(str(tmp_path / "one"))],
                               rtol=1e-5)
    assert np.isclose(sharded["validation/loss"], one["validation/loss"], rtol=1e-5)

    # Rules from the command line: 'embed' replicated turns FSDP into plain data parallelism.
    replicated = _parse_cli(base + ["--config.mesh.data=2", "--config.mesh.fsdp=4",
                                    "--config.logical_axis_rules=(('batch', ('data', 'fsdp')), ('embed', None))"])
    spec = validate_config(replicated)
    assert dict(spec.rules)["embed"] is None
    program = loop._program(replicated, spec)
    assert not any("fsdp" in s.spec for s in jax.tree.leaves(program.shardings.params))
    with pytest.raises(ValueError, match=r"model.d_model=16 is not divisible by mesh.fsdp=3"):
        validate_config(_parse_cli(base + ["--config.mesh.data=1", "--config.mesh.fsdp=3",
                                           "--config.batch_size=6"]), device_count=8)
