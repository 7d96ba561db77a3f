"""Pretrained checkpoints from other libraries, loaded into our modules.

* :func:`load_hf` -- a local Hugging Face Longformer / BigBird checkpoint
  directory -> ``(model, variables)`` (see :mod:`globalattn.models.hf`).
"""
from globalattn.models.hf import ARCHITECTURES, config_from_hf, load_hf

__all__ = ["ARCHITECTURES", "config_from_hf", "load_hf"]
