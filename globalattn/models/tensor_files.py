"""Reading the tensor files of a Hugging Face checkpoint directory into numpy.

* ``model.safetensors`` and sharded ``model.safetensors.index.json``: read here
  with numpy alone (the format is an 8-byte little-endian header length, a JSON
  header ``{name: {dtype, shape, data_offsets}}``, then raw little-endian data),
  so loading needs neither torch nor the ``safetensors`` package.
* ``pytorch_model.bin`` (and its sharded index): through ``torch.load`` with
  ``weights_only=True``, only when torch is installed; otherwise a ValueError
  says what to install.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict

import ml_dtypes
import numpy as np

__all__ = ["read_safetensors", "write_safetensors", "read_checkpoint_tensors"]

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file, by name (numpy arrays, file dtype)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file ({len(blob)} bytes)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError(f"{path}: header length {n} exceeds the file size {len(blob)}")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, not one of "
                             f"{sorted(_DTYPES)}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name!r} data_offsets {info['data_offsets']} do not "
                             f"match shape {list(shape)} of {info['dtype']}")
        out[name] = np.frombuffer(data[start:end], dtype=dtype.newbyteorder("<")).reshape(shape)
    return out


def write_safetensors(path: str, tensors: Dict[str, np.ndarray]) -> None:
    """Writes ``tensors`` as one ``.safetensors`` file (names sorted, data 8-byte aligned)."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in names:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}, not one of {sorted(_DTYPES)}")
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for raw in chunks:
            f.write(raw)


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or convert "
            f"the checkpoint to model.safetensors") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in state.items()}


def read_checkpoint_tensors(model_dir: str) -> Dict[str, np.ndarray]:
    """Every tensor of the checkpoint in ``model_dir``, by its Hugging Face name.

    Looks for, in order: ``model.safetensors``, ``model.safetensors.index.json``,
    ``pytorch_model.bin``, ``pytorch_model.bin.index.json``.
    """
    candidates = [("model.safetensors", read_safetensors),
                  ("model.safetensors.index.json", read_safetensors),
                  ("pytorch_model.bin", _read_torch),
                  ("pytorch_model.bin.index.json", _read_torch)]
    for fname, reader in candidates:
        path = os.path.join(model_dir, fname)
        if not os.path.exists(path):
            continue
        if not fname.endswith(".index.json"):
            return reader(path)
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        out: Dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(reader(os.path.join(model_dir, shard)))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise ValueError(f"{path} lists tensors its shards lack: {missing[:10]}")
        return out
    raise ValueError(f"{model_dir} holds no model.safetensors, pytorch_model.bin or their "
                     f"sharded index; found {sorted(os.listdir(model_dir))}")
