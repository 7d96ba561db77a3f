"""Fine-tuning from a converted pretrained checkpoint: ``config.init_from=DIR``.

``DIR`` is what ``python -m globalattn.convert hf --model-dir HF_DIR --out DIR``
wrote, or a Hugging Face checkpoint directory itself (converted in memory by
:func:`globalattn.models.load_hf` on every start; convert once for big models).
With ``init_from`` set, the run's model is the pretrained encoder
(Longformer or BigBird, from ``DIR/pretrained.json``) with the task's head, and
its parameters start from ``DIR/params`` instead of the random init:

* the encoder (embeddings, every layer, the pooler when it has one) must match
  the checkpoint exactly -- a missing or misshaped tensor is a ValueError
  naming it;
* the task head (``classifier`` for ``model.head='classify'``, ``qa`` for
  ``'span'``) is loaded when the checkpoint has one of the same shape (a model
  already fine-tuned on the task), else it keeps its fresh init; which one
  happened is printed.

Global tokens come from the task, by ``model.strategy.name``: ``'cls'`` (the
first real token, Longformer classification), ``'task'`` (the tokens of
segment ``strategy.question_segment``, Longformer QA; capacity
``strategy.num_globals``), ``'bigbird'`` (BigBird's own first / last blocks;
``strategy.train_random`` / ``eval_random`` / ``eval_seed`` are its
random-block policy). Model fields that the checkpoint fixes (``d_model``,
``num_layers``, ``window``, ...) are not used; ``model.dropout``, ``remat``,
``dtype`` and ``param_dtype`` are.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from globalattn import patterns
from globalattn.models.converted import load_converted, read_converted_config
from globalattn.models.hf import config_from_hf, load_hf, read_config
from globalattn.modules.bigbird import BigBird
from globalattn.modules.longformer import Longformer
from globalattn.modules.roberta import PretrainedConfig, roberta_positions

__all__ = ["FinetuneModel", "build_finetune_model", "load_init_params"]

_HEADS = {"classify": "classify", "span": "qa"}
_HEAD_GROUP = {"classify": "classifier", "qa": "qa"}
_GLOBALS = {"longformer": ("cls", "task"), "bigbird": ("bigbird",)}


def _is_hf(path: str) -> bool:
    return (not os.path.exists(os.path.join(path, "pretrained.json"))
            and os.path.exists(os.path.join(path, "config.json")))


def read_init_config(path: str) -> PretrainedConfig:
    """The encoder config of a converted or Hugging Face directory."""
    return config_from_hf(read_config(path)) if _is_hf(path) else read_converted_config(path)


def load_init_source(path: str) -> Tuple[PretrainedConfig, Dict[str, Any]]:
    """``(cfg, params)`` (host numpy) of a converted or Hugging Face directory."""
    if not _is_hf(path):
        return load_converted(path)
    model, variables = load_hf(path)
    return model.cfg, jax.tree.map(np.asarray, variables["params"])


class FinetuneModel(nn.Module):
    """A pretrained encoder behind the training loop's model contract.

    ``__call__(tokens [B, T], padding_mask [B, T], segment_ids [B, T] | None, *,
    num_active_globals=None, deterministic=True)`` returns ``logits [B, C]``
    (classify) or ``(start, end)`` logits ``[B, T]`` each (span). Parameters
    live under ``pretrained`` with the tree :func:`globalattn.models.load_hf` gives.
    """

    cfg: PretrainedConfig
    globals: str  # 'cls' | 'task' | 'bigbird'
    question_segment: int = 0

    @nn.compact
    def __call__(self, tokens, padding_mask, segment_ids=None, *, num_active_globals=None,
                 deterministic: bool = True):
        if num_active_globals is not None:
            raise ValueError("num_active_globals is not supported with init_from (the globals "
                             "are the task's: every CLS / question token)")
        cfg = self.cfg
        if cfg.arch == "longformer":
            if self.globals == "cls":
                glob = patterns.cls(padding_mask)
            else:
                if segment_ids is None:
                    raise ValueError("strategy 'task' needs segment_ids to find the question")
                glob = patterns.from_segments(segment_ids, (self.question_segment,), padding_mask)
            # Positions from the mask: the data's pad id need not be the checkpoint's.
            out = Longformer(cfg, name="pretrained")(
                tokens, attention_mask=padding_mask, global_attention_mask=glob,
                position_ids=roberta_positions(padding_mask, cfg.pad_token_id),
                deterministic=deterministic)
        else:
            out = BigBird(cfg, name="pretrained")(tokens, attention_mask=padding_mask,
                                                  deterministic=deterministic)
        if cfg.head == "classify":
            return out["logits"]
        return out["start_logits"], out["end_logits"]


def build_finetune_model(init_from: str, model_cfg: ml_collections.ConfigDict) -> FinetuneModel:
    """The run's model for a converted checkpoint and the (resolved) ``config.model``."""
    cfg = read_init_config(init_from)
    errors = []
    if model_cfg.head not in _HEADS:
        errors.append(f"model.head={model_cfg.head!r}: init_from supports {sorted(_HEADS)}")
    s = model_cfg.strategy
    if s.name not in _GLOBALS[cfg.arch]:
        errors.append(f"model.strategy.name={s.name!r}: a {cfg.arch} checkpoint takes "
                      f"{_GLOBALS[cfg.arch]}")
    if model_cfg.vocab_size is not None and model_cfg.vocab_size > cfg.vocab_size:
        errors.append(f"the task's vocabulary ({model_cfg.vocab_size}) exceeds the checkpoint's "
                      f"vocab_size={cfg.vocab_size}")
    T = model_cfg.max_len
    if T is not None:
        if cfg.arch == "longformer":
            need = T + cfg.pad_token_id + 1
        else:
            need = -(-T // cfg.block_size) * cfg.block_size
        if need > cfg.max_position_embeddings:
            errors.append(f"sequence length T={T} needs {need} position embeddings; the "
                          f"checkpoint has max_position_embeddings={cfg.max_position_embeddings}")
    if errors:
        raise ValueError(f"init_from={init_from}: " + "; ".join(errors))
    head = _HEADS[model_cfg.head]
    over = dict(head=head, dropout=float(model_cfg.dropout), remat=bool(model_cfg.remat),
                dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype)
    if head == "classify":
        over["num_labels"] = int(model_cfg.num_classes)
    if s.name == "cls":
        over["max_globals"] = 1
    elif s.name == "task":
        over["max_globals"] = int(s.num_globals)
    else:
        over.update(train_random=s.train_random, eval_random=s.eval_random,
                    eval_seed=int(s.eval_seed))
    return FinetuneModel(cfg.replace(**over), s.name, int(s.question_segment))


def load_init_params(init_from: str, params: Any, *, log=print) -> Any:
    """``params`` (the fresh, placed train-state params of a :class:`FinetuneModel`)
    with every tensor the checkpoint has put in its place, in the same shardings.

    Raises ValueError naming encoder tensors that are missing or misshaped,
    and checkpoint tensors the model has no place for.
    """
    _, loaded = load_init_source(init_from)
    fresh = flax.traverse_util.flatten_dict(flax.core.unfreeze(params)["pretrained"])
    ckpt = flax.traverse_util.flatten_dict(loaded)
    head_groups = set(_HEAD_GROUP.values())
    missing, misshaped, kept_fresh = [], [], set()
    out = {}
    for path, leaf in fresh.items():
        name = "/".join(path)
        src = ckpt.get(path)
        if src is not None and tuple(src.shape) != tuple(leaf.shape):
            if path[0] in head_groups:
                src = None  # a head for another label set: start it fresh
            else:
                misshaped.append(f"{name} {list(src.shape)} (model needs {list(leaf.shape)})")
                continue
        if src is None:
            if path[0] in head_groups:
                kept_fresh.add(path[0])
                out[path] = leaf
                continue
            missing.append(name)
            continue
        host = np.asarray(src, dtype=leaf.dtype)
        out[path] = jax.make_array_from_callback(leaf.shape, leaf.sharding,
                                                 lambda idx, h=host: h[idx])
    extra = sorted("/".join(p) for p in ckpt if p not in fresh and p[0] not in head_groups)
    errors = []
    if missing:
        errors.append(f"missing tensors: {missing}")
    if misshaped:
        errors.append(f"misshaped tensors: {misshaped}")
    if extra:
        errors.append(f"tensors the model has no place for: {extra}")
    if errors:
        raise ValueError(f"init_from={init_from} does not fit the model: " + "; ".join(errors))
    loaded_groups = sorted({p[0] for p in out} - kept_fresh)
    unused_heads = sorted({p[0] for p in ckpt if p[0] in head_groups} - {p[0] for p in fresh})
    log(f"init_from {init_from}: loaded {loaded_groups}"
        + (f"; fresh init for {sorted(kept_fresh)}" if kept_fresh else "")
        + (f"; not used (another task's head): {unused_heads}" if unused_heads else ""))
    return {**params, "pretrained": flax.traverse_util.unflatten_dict(out)}


def maybe_build(init_from: Optional[str], model_cfg: ml_collections.ConfigDict,
                build_model) -> nn.Module:
    """``build_finetune_model`` when ``init_from`` is set, else ``build_model(model_cfg)``."""
    if init_from is None:
        return build_model(model_cfg)
    return build_finetune_model(init_from, model_cfg)
