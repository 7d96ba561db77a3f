"""Convert pretrained checkpoints into our format (for ``--config.init_from``).

    python -m globalattn.convert hf --model-dir /path/to/longformer-base-4096 --out /ckpt/lf_base

reads a local Hugging Face Longformer / BigBird checkpoint directory
(``config.json`` + ``model.safetensors``, or ``pytorch_model.bin`` with torch
installed), checks every tensor (see :func:`globalattn.models.load_hf`) and
writes ``pretrained.json`` + an orbax ``params/`` checkpoint to ``--out``.
Options: ``--dtype`` / ``--param_dtype`` stored parameter and compute dtypes
(default float32).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from globalattn.models.converted import save_converted
from globalattn.models.hf import load_hf, read_config

__all__ = ["convert_hf", "main"]


def convert_hf(model_dir: str, out_dir: str, *, param_dtype: str = "float32",
               dtype: str = "float32") -> str:
    """Converts the Hugging Face checkpoint in ``model_dir``; returns ``out_dir``."""
    model, variables = load_hf(model_dir, param_dtype=param_dtype, dtype=dtype)
    hf = read_config(model_dir)
    save_converted(out_dir, model.cfg, variables["params"],
                   {"format": "huggingface", "model_dir": os.path.abspath(model_dir),
                    "architectures": hf.get("architectures"),
                    "transformers_version": hf.get("transformers_version")})
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m globalattn.convert", description=__doc__)
    sub = p.add_subparsers(dest="source", required=True)
    hf = sub.add_parser("hf", help="a local Hugging Face Longformer / BigBird directory")
    hf.add_argument("--model-dir", required=True)
    hf.add_argument("--out", required=True)
    hf.add_argument("--param_dtype", default="float32")
    hf.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    out = convert_hf(args.model_dir, args.out, param_dtype=args.param_dtype, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
