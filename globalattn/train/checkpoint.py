"""Checkpoints: orbax CheckpointManager, verified restore, and save-on-SIGTERM.

One checkpoint (``<workdir>/checkpoints/<step>/``) holds three items:

* ``state``: ``{'train_state': TrainState, 'rng': uint32 key data}`` (orbax
  StandardSave: params, optimizer state, step, non-finite counters, PRNG key);
* ``data``: the grain iterator position, one JSON file per process;
* ``meta``: JSON with the step, a :func:`~globalattn.train.state.fingerprint`
  of ``state``, the data position (process 0's iterator state) and a fingerprint
  of every process's position, a signature of the state's layout, and the jax
  version / PRNG impl.

The directory is checked for writability when the :class:`Checkpointer` is
made (before any training): an unwritable one is an ``OSError`` that names it
(``writable=False`` skips the check, to load a finished run from read-only
storage).

Saves are asynchronous (device-to-host copy before ``save`` returns, writing in
a background thread), but the step's directory is created before ``save``
returns, so a directory that became unwritable fails that ``save`` at once
(orbax would otherwise create it in the background, and ``save`` would wait
for it until a timeout, e.g. 300 s, then report the timeout, not the cause).
Errors of the background writes surface at the next save or at
:meth:`Checkpointer.close`. orbax writes into a temporary directory and renames
it on commit, so an interrupted save leaves no step directory.

Restore walks the steps from the newest: a step whose directory is empty or
unreadable, or whose contents do not match the stored fingerprints (the state,
or the data position: a position edited to another valid one would otherwise
resume on other batches), is moved to ``<workdir>/corrupt_checkpoints/`` with a
warning naming the mismatching values, and the previous step is tried. A
checkpoint written before data positions were fingerprinted restores with a
warning that its position is unverified. A step written by a differently
shaped model (a changed config) is an error, not corruption: its checkpoints
are left alone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from typing import Any

import grain
import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from globalattn.train.state import fingerprint

__all__ = ["Checkpointer", "CorruptCheckpointError", "PreemptionGuard", "check_writable",
           "state_signature"]


class CorruptCheckpointError(RuntimeError):
    """A checkpoint step exists but cannot be trusted."""


def state_signature(abstract_payload: Any) -> str:
    """A hash of the payload's tree structure, shapes and dtypes (not its values)."""
    leaves, treedef = jax.tree.flatten(abstract_payload)
    desc = repr(treedef) + "".join(f"|{tuple(x.shape)}:{x.dtype}" for x in leaves)
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def check_writable(directory: str) -> None:
    """Creates ``directory`` if needed and checks that entries can be made in it.

    A probe directory is made and removed (as orbax makes one per step), so a
    read-only directory, one under a regular file, or a read-only file system
    is found here rather than at the first save.

    Raises:
      OSError (PermissionError, NotADirectoryError, ...): naming ``directory``.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".write_probe.", dir=directory))
    except OSError as err:
        raise type(err)(err.errno, f"checkpoint directory {directory} is not writable "
                        f"({err.strerror}: {err.filename}): fix its permissions or use "
                        "another --workdir") from err


def _iterator_state(iterator: Any) -> dict[str, Any]:
    """The iterator's position as a JSON object (grain gives JSON bytes or a dict)."""
    state = iterator.get_state()
    if isinstance(state, (bytes, bytearray)):
        state = state.decode()
    if isinstance(state, str):
        state = json.loads(state)
    # A JSON round trip: the saved copy (meta) and a restored one compare equal.
    return json.loads(json.dumps(state, sort_keys=True))


def data_fingerprint(iterator: Any) -> str:
    """A 64-bit hex checksum of every process's iterator position (process order counts)."""
    digest = hashlib.sha256(json.dumps(_iterator_state(iterator), sort_keys=True).encode())
    h = np.frombuffer(digest.digest()[:8], np.uint32).copy()
    if jax.process_count() > 1:
        parts = np.asarray(multihost_utils.process_allgather(h)).reshape(-1, 2)
        weights = (2 * np.arange(len(parts), dtype=np.uint32) + 1)[:, None]
        with np.errstate(over="ignore"):
            h = (parts.astype(np.uint32) * weights).sum(axis=0, dtype=np.uint32)
    return f"{int(h[0]):08x}{int(h[1]):08x}"


def _position_diff(got: dict[str, Any], saved: dict[str, Any]) -> str:
    """The iterator-state fields that differ, as 'field RESTORED != saved SAVED'."""
    keys = sorted(k for k in set(got) | set(saved) if got.get(k) != saved.get(k))
    return "; ".join(f"{k} {json.dumps(got.get(k))} != saved {json.dumps(saved.get(k))}"
                     for k in keys)


class Checkpointer:
    """Saves and restores (train state, rng, data iterator) under ``directory``.

    Args:
      directory: the checkpoint root (created if missing; checked for writability,
        see :func:`check_writable`, unless ``writable=False``).
      max_to_keep: newest checkpoints kept; older ones are deleted after a save.
      async_save: write in a background thread.
      quarantine_dir: where corrupt step directories are moved.
      writable: False to only read checkpoints (no writability check; saving or
        quarantining then fails where the directory is read-only).
    """

    def __init__(self, directory: str, *, max_to_keep: int, async_save: bool = True,
                 quarantine_dir: str | None = None, writable: bool = True):
        self.directory = os.path.abspath(directory)
        if writable:
            check_writable(self.directory)
        self.quarantine_dir = quarantine_dir or os.path.join(
            os.path.dirname(self.directory), "corrupt_checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,
            # The step directory is made in save() itself: an error there is raised at
            # once instead of after orbax's 300 s wait for a background mkdir.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, payload: Any, iterator: grain.DataLoaderIterator,
             signature: str) -> None:
        """Starts saving ``payload`` and the iterator position as checkpoint ``step``."""
        meta = {"step": int(step), "fingerprint": fingerprint(payload), "signature": signature,
                "data_position": _iterator_state(iterator),
                "data_fingerprint": data_fingerprint(iterator),
                "jax_version": jax.__version__,
                "prng_impl": str(jax.config.jax_default_prng_impl), "time": time.time()}
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(payload),
            data=grain.checkpoint.CheckpointSave(iterator),
            meta=ocp.args.JsonSave(meta)))
        self.manager.check_for_errors()

    def restore_latest(self, abstract_payload: Any, iterator: grain.DataLoaderIterator | None,
                       signature: str) -> tuple[int, Any] | None:
        """``(step, payload)`` of the newest trustworthy checkpoint, or None if there is none.

        Sets ``iterator`` to the saved position (None: the state only, e.g. to
        load a finished run's parameters). ``abstract_payload`` gives
        shapes, dtypes and shardings (restoring onto another mesh works).

        Raises:
          ValueError: the newest readable checkpoint has another state layout.
          RuntimeError: checkpoints exist but none could be restored.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                payload = self._restore_step(step, abstract_payload, iterator, signature)
            except CorruptCheckpointError as err:
                moved = self._quarantine(step)
                warnings.warn(f"skipping checkpoint step {step} in {self.directory}: {err}; "
                              f"moved it to {moved}; trying the previous one", stacklevel=2)
                continue
            return step, payload
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be "
                               f"restored (moved to {self.quarantine_dir}); refusing to restart "
                               "from scratch silently: delete the workdir to start afresh")
        return None

    def _restore_step(self, step: int, abstract_payload: Any,
                      iterator: grain.DataLoaderIterator | None, signature: str) -> Any:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001 -- any failure to read means corrupt
            raise CorruptCheckpointError(f"its metadata is unreadable ({type(err).__name__}: "
                                         f"{_short(err)})") from err
        if not isinstance(meta, dict) or meta.get("step") != step or "fingerprint" not in meta:
            raise CorruptCheckpointError(f"its metadata {meta!r} does not describe step {step}")
        if meta.get("signature") != signature:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} holds a state of another layout "
                f"(signature {meta.get('signature')} != {signature}): the model or optimizer "
                "config changed since it was written; use a new --workdir")
        try:
            items = {"state": ocp.args.StandardRestore(abstract_payload)}
            if iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"its contents are unreadable ({type(err).__name__}: {_short(err)})") from err
        payload = restored["state"]
        got = fingerprint(payload)
        if got != meta["fingerprint"]:
            raise CorruptCheckpointError(f"its contents changed after saving (fingerprint "
                                         f"{got} != saved {meta['fingerprint']})")
        if iterator is not None:
            self._check_data_position(step, meta, iterator)
        return payload

    def _check_data_position(self, step: int, meta: dict[str, Any], iterator: Any) -> None:
        """Raises CorruptCheckpointError if the restored position is not the saved one."""
        if "data_fingerprint" not in meta:
            warnings.warn(f"checkpoint step {step} in {self.directory} was written before data "
                          "positions were fingerprinted: its data position is not verified",
                          stacklevel=4)
            return
        got = data_fingerprint(iterator)
        if got == meta["data_fingerprint"]:
            return
        detail = ""
        if jax.process_index() == 0 and isinstance(meta.get("data_position"), dict):
            detail = _position_diff(_iterator_state(iterator), meta["data_position"])
            detail = f"; process 0: {detail}" if detail else ""
        raise CorruptCheckpointError(
            f"its data position changed after saving (data fingerprint {got} != saved "
            f"{meta['data_fingerprint']}{detail}): resuming would train on other batches")

    def _quarantine(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.quarantine_dir, f"{step}.{int(time.time() * 1000)}")
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(self.quarantine_dir, exist_ok=True)
            shutil.move(src, dst)
        if jax.process_count() > 1:  # nobody reloads the step list before the move is done
            multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        """Blocks until pending saves are committed; raises a background save's error."""
        self.manager.wait_until_finished()
        self.manager.check_for_errors()

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _short(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    return text if len(text) <= limit else text[:limit] + "..."


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag the train loop checks between steps.

    The loop then saves a checkpoint and returns, instead of dying mid-write.
    A second SIGINT falls through to the previous handler (Ctrl-C twice
    interrupts at once). Handlers are only installed from the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def triggered(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            return
        self.signal = signum

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
