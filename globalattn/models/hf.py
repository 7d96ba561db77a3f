"""Hugging Face Longformer / BigBird checkpoints -> our Flax encoders.

:func:`load_hf` reads a local checkpoint directory (``config.json`` plus
``model.safetensors``, or ``pytorch_model.bin`` when torch is installed) and
returns ``(model, variables)``; nothing is downloaded.

Supported ``architectures`` (``config.json``) and what is built:

==========================================  =====================================
LongformerModel                             encoder + pooler
LongformerForMaskedLM                       encoder (the LM head is not loaded)
LongformerForSequenceClassification         encoder + classification head
LongformerForQuestionAnswering              encoder + start/end logits
BigBirdModel                                encoder + pooler
BigBirdForPreTraining, BigBirdForMaskedLM   encoder + pooler (MLM / NSP heads not loaded)
BigBirdForSequenceClassification            encoder + pooler + classification head
==========================================  =====================================

Every tensor of our model must be in the checkpoint with the right shape, and
every checkpoint tensor must be used, except the pretraining heads named
above (and stale ``position_ids`` / ``token_type_ids`` buffers): otherwise a
ValueError names each missing, unused or misshaped tensor.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from globalattn.models.tensor_files import read_checkpoint_tensors
from globalattn.modules.bigbird import BigBird
from globalattn.modules.longformer import Longformer
from globalattn.modules.roberta import PretrainedConfig

__all__ = ["ARCHITECTURES", "config_from_hf", "build", "hf_tensor_map", "params_from_tensors",
           "load_hf"]

# architecture -> (arch, prefix of the encoder's tensors, pooler, head, unused tensor prefixes)
ARCHITECTURES: Dict[str, Tuple[str, str, bool, Optional[str], Tuple[str, ...]]] = {
    "LongformerModel": ("longformer", "", True, None, ()),
    "LongformerForMaskedLM": ("longformer", "longformer.", False, None,
                              ("lm_head.", "longformer.pooler.")),
    "LongformerForSequenceClassification": ("longformer", "longformer.", False, "classify", ()),
    "LongformerForQuestionAnswering": ("longformer", "longformer.", False, "qa", ()),
    "BigBirdModel": ("bigbird", "", True, None, ()),
    "BigBirdForPreTraining": ("bigbird", "bert.", True, None, ("cls.",)),
    "BigBirdForMaskedLM": ("bigbird", "bert.", True, None, ("cls.",)),
    "BigBirdForSequenceClassification": ("bigbird", "bert.", True, "classify", ()),
}
# Buffers some older checkpoints saved; they hold no parameters.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _architecture(hf: Dict[str, Any]) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {archs or hf.get('model_type')!r} in config.json; "
                         f"supported: {sorted(ARCHITECTURES)}")
    return archs[0]


def config_from_hf(hf: Dict[str, Any], **overrides) -> PretrainedConfig:
    """Our :class:`PretrainedConfig` from a Hugging Face ``config.json`` dict.

    ``overrides`` replace fields that do not change the checkpoint's function
    or shapes' meaning: ``max_globals``, ``dropout``, ``remat``, ``dtype``,
    ``param_dtype``, the BigBird random policy (``train_random``,
    ``eval_random``, ``eval_seed``), and ``head`` / ``num_labels`` (a new head
    is then initialised rather than loaded; see :func:`load_hf`).
    """
    name = _architecture(hf)
    arch, _, pooler, head, _ = ARCHITECTURES[name]
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError(f"{name}: decoder / cross-attention configs are not supported "
                         f"(is_decoder={hf.get('is_decoder')}, "
                         f"add_cross_attention={hf.get('add_cross_attention')})")
    pos_type = hf.get("position_embedding_type", "absolute")
    if pos_type != "absolute":
        raise ValueError(f"{name}: position_embedding_type={pos_type!r} is not supported "
                         f"(only 'absolute')")
    num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 2)
    common = dict(
        arch=arch, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "gelu"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), pad_token_id=hf.get("pad_token_id", 0),
        sep_token_id=hf.get("sep_token_id"), pooler=pooler, head=head, num_labels=num_labels)
    if arch == "longformer":
        w = hf.get("attention_window", 512)
        windows = tuple(w) if isinstance(w, (list, tuple)) else (w,) * hf["num_hidden_layers"]
        cfg = PretrainedConfig(positions="roberta", attention_windows=windows,
                               classifier_act="tanh", **common)
    else:
        cfg = PretrainedConfig(
            positions="absolute", attention_type=hf.get("attention_type", "block_sparse"),
            block_size=hf.get("block_size", 64), num_random_blocks=hf.get("num_random_blocks", 3),
            use_bias=hf.get("use_bias", True),
            rescale_embeddings=hf.get("rescale_embeddings", False),
            classifier_act=common["hidden_act"], **common)
    allowed = {"max_globals", "dropout", "remat", "dtype", "param_dtype", "train_random",
               "eval_random", "eval_seed", "head", "num_labels"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"cannot override {bad}: they are fixed by the checkpoint; allowed: "
                         f"{sorted(allowed)}")
    return cfg.replace(**overrides)


def build(cfg: PretrainedConfig) -> nn.Module:
    """The Flax module for ``cfg``: :class:`Longformer` or :class:`BigBird`."""
    return Longformer(cfg) if cfg.arch == "longformer" else BigBird(cfg)


def _split_heads(cfg: PretrainedConfig) -> Callable:
    D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def kernel_in(w):  # torch Linear [N*H, D] -> DenseGeneral [D, N, H]
        return w.T.reshape(D, N, H)

    def bias_in(b):
        return b.reshape(N, H)

    def kernel_out(w):  # [D, N*H] -> [N, H, D]
        return w.T.reshape(N, H, D)

    return kernel_in, bias_in, kernel_out


def hf_tensor_map(cfg: PretrainedConfig, prefix: str, param_paths: List[Tuple[str, ...]]
                  ) -> Dict[Tuple[str, ...], Tuple[str, Callable]]:
    """Our parameter path -> (Hugging Face tensor name, numpy transform to our layout)."""
    kernel_in, bias_in, kernel_out = _split_heads(cfg)
    ident = lambda a: a  # noqa: E731
    transpose = lambda a: a.T  # noqa: E731
    out = {}
    for path in param_paths:
        leaf = path[-1]
        suffix = {"kernel": "weight", "bias": "bias", "scale": "weight",
                  "embedding": "weight"}[leaf]
        fn = ident
        if path[0] == "encoder" and path[1] == "embeddings":
            name = prefix + "embeddings." + ".".join(path[2:-1]) + "." + suffix
        elif path[0] == "encoder":
            i = int(path[1].split("_")[1])
            base = f"{prefix}encoder.layer.{i}."
            if path[2] == "attention" and path[3] == "self":
                name = base + f"attention.self.{path[4]}.{suffix}"
                fn = kernel_in if leaf == "kernel" else bias_in
            elif path[2] == "attention" and path[3] == "output":
                name = base + f"attention.output.{path[4]}.{suffix}"
                if path[4] == "dense" and leaf == "kernel":
                    fn = kernel_out
            elif path[2] == "ffn":
                sub = {"intermediate": "intermediate.dense", "output": "output.dense",
                       "output_LayerNorm": "output.LayerNorm"}[path[3]]
                name = base + f"{sub}.{suffix}"
                fn = transpose if leaf == "kernel" else ident
            else:
                raise ValueError(f"no checkpoint name for parameter {'/'.join(path)}")
        elif path[0] == "pooler":
            # Longformer's pooler is a module with a dense layer, BigBird's a bare Linear.
            name = prefix + ("pooler.dense." if cfg.arch == "longformer" else "pooler.") + suffix
            fn = transpose if leaf == "kernel" else ident
        elif path[0] == "classifier":
            name = f"classifier.{path[1]}.{suffix}"
            fn = transpose if leaf == "kernel" else ident
        elif path[0] == "qa":
            name = f"qa_outputs.{suffix}"
            fn = transpose if leaf == "kernel" else ident
        else:
            raise ValueError(f"no checkpoint name for parameter {'/'.join(path)}")
        out[path] = (name, fn)
    return out


def init_params(cfg: PretrainedConfig, key: jax.Array, abstract: bool = False) -> Dict:
    """Freshly initialised (or, with ``abstract``, only shaped) unboxed params of ``cfg``."""
    # Parameters do not depend on the global capacity; a static one lets init trace.
    model = build(cfg.replace(max_globals=8))
    ids = jnp.zeros((1, 8), jnp.int32)
    kw = {"global_attention_mask": jnp.ones((1, 8), bool)} if cfg.arch == "longformer" else {}
    fn = lambda: model.init(key, ids, **kw)["params"]  # noqa: E731
    params = jax.eval_shape(fn) if abstract else fn()
    return flax.core.unfreeze(nn.unbox(params))


def params_from_tensors(cfg: PretrainedConfig, tensors: Dict[str, np.ndarray], prefix: str,
                        unused_prefixes: Tuple[str, ...] = (), skip: Tuple[str, ...] = ()
                        ) -> Dict:
    """Our ``params`` tree from Hugging Face tensors; every mismatch is a ValueError.

    ``skip``: top-level parameter groups (e.g. ``('classifier',)``) left out of
    the result because the caller initialises them fresh.
    """
    abstract = init_params(cfg, jax.random.key(0), abstract=True)
    flat = flax.traverse_util.flatten_dict(abstract)
    paths = [p for p in flat if p[0] not in skip]
    mapping = hf_tensor_map(cfg, prefix, paths)
    dtype = cfg.jnp_param_dtype
    missing, misshaped, used, result = [], [], set(), {}
    for path in paths:
        name, fn = mapping[path]
        src = tensors.get(name)
        if src is None and name.endswith("LayerNorm.weight"):  # pre-2020 TF-style names
            name = name[:-len("weight")] + "gamma"
            src = tensors.get(name)
        elif src is None and name.endswith("LayerNorm.bias"):
            name = name[:-len("bias")] + "beta"
            src = tensors.get(name)
        if src is None:
            missing.append(mapping[path][0])
            continue
        used.add(name)
        want = tuple(flat[path].shape)
        try:
            arr = fn(np.asarray(src))
        except ValueError:
            arr = None
        if arr is None or tuple(arr.shape) != want:
            misshaped.append(f"{name} {list(src.shape)} (our {'/'.join(path)} needs {list(want)})")
            continue
        result[path] = jnp.asarray(np.asarray(arr, np.float32) if arr.dtype != np.float32
                                   else arr, dtype=dtype)
    known_unused = tuple(unused_prefixes) + tuple(prefix + b for b in _BUFFERS)
    extra = sorted(k for k in tensors if k not in used and not k.startswith(known_unused))
    if skip:
        extra = [k for k in extra if not any(k.startswith(_hf_group(s)) for s in skip)]
    errors = []
    if missing:
        errors.append(f"missing tensors: {missing}")
    if extra:
        errors.append(f"unexpected tensors: {extra}")
    if misshaped:
        errors.append(f"misshaped tensors: {misshaped}")
    if errors:
        raise ValueError(f"checkpoint does not match the {cfg.arch} model: " + "; ".join(errors))
    return flax.traverse_util.unflatten_dict(result)


def _hf_group(group: str) -> str:
    return {"classifier": "classifier.", "qa": "qa_outputs.", "pooler": "pooler."}.get(
        group, group + ".")


def read_config(model_dir: str) -> Dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{model_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def load_hf(model_dir: str, *, init_key: Optional[jax.Array] = None, **overrides
            ) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model, variables)`` for the Hugging Face checkpoint in ``model_dir``.

    ``model.apply(variables, input_ids, attention_mask=..., global_attention_mask=...)``
    (Longformer) or ``model.apply(variables, input_ids, attention_mask=...,
    random_blocks=...)`` (BigBird) returns a dict with ``last_hidden_state``
    ``[B, T, D]`` and, as the checkpoint has them, ``pooler_output``,
    ``logits`` or ``start_logits`` / ``end_logits``.

    ``overrides``: see :func:`config_from_hf`. Overriding ``head`` (or
    ``num_labels`` of a classifier) builds that head fresh from ``init_key``
    (default ``jax.random.key(0)``) instead of loading it; the checkpoint's own
    head tensors are then not used (and not an error).
    """
    hf = read_config(model_dir)
    name = _architecture(hf)
    _, prefix, _, ckpt_head, unused = ARCHITECTURES[name]
    cfg = config_from_hf(hf, **overrides)
    tensors = read_checkpoint_tensors(model_dir)
    fresh_head = cfg.head is not None and (cfg.head != ckpt_head or (
        cfg.head == "classify" and cfg.num_labels != config_from_hf(hf).num_labels))
    head_group = {"classify": "classifier", "qa": "qa"}
    skip = (head_group[cfg.head],) if fresh_head else ()
    if ckpt_head is not None and (fresh_head or cfg.head is None):
        unused = unused + (_hf_group(head_group[ckpt_head]),)
    params = params_from_tensors(cfg, tensors, prefix, unused, skip)
    model = build(cfg)
    if skip:
        key = jax.random.key(0) if init_key is None else init_key
        init = init_params(cfg, key)
        params = {**params, **{g: init[g] for g in skip}}
    return model, {"params": params}
