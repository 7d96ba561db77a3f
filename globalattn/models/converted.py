"""Our on-disk form of a converted pretrained model: what ``init_from`` reads.

A directory with ``pretrained.json`` (the :class:`PretrainedConfig` fields and
where they came from) and ``params/`` (an orbax PyTree checkpoint of the
unboxed parameter tree, as :func:`globalattn.models.load_hf` returns it).
``python -m globalattn.convert hf --model-dir DIR --out OUT`` writes one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from globalattn.modules.roberta import PretrainedConfig

__all__ = ["save_converted", "load_converted", "read_converted_config"]

_META = "pretrained.json"
_PARAMS = "params"


def save_converted(out_dir: str, cfg: PretrainedConfig, params: Dict[str, Any],
                   source: Dict[str, Any]) -> None:
    """Writes ``cfg`` and ``params`` (any arrays) to ``out_dir`` (created; params replaced)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, _META), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "source": source}, f, indent=1,
                  sort_keys=True)
    host = jax.tree.map(np.asarray, params)
    ocp.PyTreeCheckpointer().save(os.path.abspath(os.path.join(out_dir, _PARAMS)), host,
                                  force=True)


def read_converted_config(path: str) -> PretrainedConfig:
    """The :class:`PretrainedConfig` of a converted directory (ValueError if not one)."""
    meta = os.path.join(path, _META)
    if not os.path.exists(meta):
        raise ValueError(f"{path} is not a converted checkpoint (no {_META}); make one with "
                         f"python -m globalattn.convert hf --model-dir HF_DIR --out {path}")
    with open(meta) as f:
        fields = json.load(f)["config"]
    known = {f.name for f in dataclasses.fields(PretrainedConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{meta} has fields this version does not know: {unknown}")
    fields["attention_windows"] = tuple(fields.get("attention_windows", ()))
    return PretrainedConfig(**fields)


def load_converted(path: str) -> Tuple[PretrainedConfig, Dict[str, Any]]:
    """``(cfg, params)`` with params as host numpy arrays (every process reads them whole)."""
    cfg = read_converted_config(path)
    ckpt = os.path.abspath(os.path.join(path, _PARAMS))
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(ckpt).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return cfg, checkpointer.restore(ckpt, restore_args=args)
