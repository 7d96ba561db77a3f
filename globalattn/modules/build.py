"""Models by name from an ml_collections ConfigDict.

``build_model(default_model_config())`` gives a working model; an experiment
swaps the global-token strategy by changing ``strategy.name`` alone (every
strategy's parameters have defaults in the same ``strategy`` block).
"""
from __future__ import annotations

import numbers
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from globalattn.modules.encoder import SCHEDULES, Encoder, schedule_period
from globalattn.modules.lm import CausalLM
from globalattn.modules.heads import (HEADS, POOLINGS, ClassifyHead, LMHead, SpanHead,
                                      TokenHead)
from globalattn.modules.model import Embedder, GlobalTokenModel
from globalattn.modules.perceiver import Perceiver, PerceiverModel
from globalattn.modules.strategies import RANDOM_POLICIES, STRATEGIES, GlobalStrategy

__all__ = ["default_model_config", "build_model", "build_strategy", "ARCHS", "DTYPES"]

ARCHS = ("encoder", "perceiver", "lm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_model_config() -> ml_collections.ConfigDict:
    """Every model field with its default; locked, so a misspelt override fails."""
    c = ml_collections.ConfigDict()
    c.arch = "encoder"  # 'encoder' | 'perceiver' | 'lm' (CausalLM: RoPE, sinks, streaming)
    c.vocab_size = 256
    c.max_len = 128  # learned absolute positions of data tokens
    c.rope = False  # also rotary (relative) positions in every encoder attention layer
    c.num_segments = 2  # segment (token-type) embeddings added when segment_ids given; 0 = none
    c.d_model = 64
    c.num_heads = 4
    c.mlp_dim = 256
    c.num_layers = 2
    c.dropout = 0.1  # embeddings, residual branches, MLP hidden
    c.window = 8  # local radius: i sees i-window..i+window; bigbird uses strategy.window_blocks
    c.causal = False  # required True for head='lm'
    c.attention_schedule = "global_local"  # 'global_local' | 'full' | 'interleaved'
    c.local_per_full = 3  # interleaved: this many global-local layers, then one full layer
    c.global_projections = False  # Longformer's separate q/k/v for global rows
    c.head = "classify"  # 'classify' [B,C] | 'token' [B,T,C] | 'span' | 'lm' [B,T,V]
    c.num_classes = 10  # classify / token
    c.pooling = "cls"  # classify: 'cls' | 'globals' | 'mean'
    c.remat = False
    c.scan = False
    c.dtype = "float32"  # computation dtype; softmax is float32 regardless
    c.param_dtype = "float32"

    s = ml_collections.ConfigDict()
    s.name = "cls"  # one of STRATEGIES
    s.num_globals = 4  # capacity G: first, periodic, task (longest question), extra, sinks
    s.period = config_dict.placeholder(int)  # periodic; None = ceil(T / num_globals)
    s.question_segment = 0  # task: segment id of the question
    s.block_size = 8  # bigbird
    s.num_random_blocks = 3  # bigbird, per query block and layer
    s.window_blocks = 3  # bigbird, odd: own block and (window_blocks-1)/2 each side
    s.train_random = "resample"  # bigbird when deterministic=False: 'resample' | 'fixed'
    s.eval_random = "fixed"  # bigbird when deterministic=True
    s.eval_seed = 0  # bigbird key for the 'fixed' policy
    s.per_example_random = False  # bigbird: a different draw per example
    s.drop_output = True  # extra: encode() returns data positions only
    s.sink_logits = False  # sinks: also a learned per-head sink logit in every layer
    c.strategy = s

    lm = ml_collections.ConfigDict()  # arch='lm' only (globalattn.modules.lm.CausalLM)
    lm.num_sink_tokens = 0  # learned sink tokens prepended to every sequence / stream
    lm.sink_logits = "none"  # 'none' | 'learned' | 'zero' (softmax-one)
    lm.rope_base = 10000.0
    c.lm = lm

    p = ml_collections.ConfigDict()
    p.num_latents = 32  # capacity; num_active_globals selects how many are active
    p.num_latent_layers = 2
    p.share_weights = False  # one latent block reused num_latent_layers times
    p.num_cross_heads = 1
    c.perceiver = p
    c.lock()
    return c


def _merged(cfg: Any) -> ml_collections.ConfigDict:
    """``cfg`` (full or partial ConfigDict / dict) laid over the defaults."""
    base = default_model_config()

    def merge(dst: ml_collections.ConfigDict, src: Mapping, prefix: str):
        for key, val in src.items():
            if key not in dst:
                raise ValueError(
                    f"unknown model config field {prefix + key!r}; valid fields: "
                    f"{sorted(dst.keys())}")
            if isinstance(dst[key], ml_collections.ConfigDict):
                if not isinstance(val, Mapping) and not isinstance(val, ml_collections.ConfigDict):
                    raise ValueError(f"model config field {prefix + key!r} must be a mapping")
                merge(dst[key], val, prefix + key + ".")
            else:
                try:
                    dst[key] = val
                except TypeError as e:
                    raise ValueError(f"model config field {prefix + key!r}: {e}") from None

    merge(base, cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg, "")
    return base


def _int(c, name: str, lo: int = 1) -> int:
    v = c[name]
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"model config {name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _choice(c, name: str, options) -> str:
    if c[name] not in options:
        raise ValueError(f"model config {name}={c[name]!r} not in {tuple(options)}")
    return c[name]


def build_strategy(s: ml_collections.ConfigDict, *, num_layers: int, num_heads: int,
                   max_len: int, param_dtype=jnp.float32) -> GlobalStrategy:
    """The strategy module named ``s.name`` with its parameters from ``s``."""
    name = _choice(s, "name", STRATEGIES)
    if name == "none":
        return STRATEGIES[name]()
    if name in ("cls", "first_last"):
        return STRATEGIES[name]()
    if name == "first":
        return STRATEGIES[name](num_globals=_int(s, "num_globals", 1))
    if name == "periodic":
        if s.period is not None:
            _int(s, "period", 1)
        return STRATEGIES[name](num_globals=_int(s, "num_globals", 1), period=s.period)
    if name == "task":
        return STRATEGIES[name](num_globals=_int(s, "num_globals", 1),
                                question_segment=s.question_segment)
    if name == "bigbird":
        bs = _int(s, "block_size", 1)
        if bs > max_len:
            raise ValueError(f"bigbird block_size={bs} exceeds max_len={max_len}")
        wb = _int(s, "window_blocks", 1)
        if wb % 2 == 0:
            raise ValueError(f"bigbird window_blocks must be odd, got {wb}")
        for field in ("train_random", "eval_random"):
            _choice(s, field, RANDOM_POLICIES)
        return STRATEGIES[name](
            block_size=bs, num_random_blocks=_int(s, "num_random_blocks", 0), window_blocks=wb,
            train_random=s.train_random, eval_random=s.eval_random, eval_seed=s.eval_seed,
            per_example=s.per_example_random, num_layers=num_layers, num_heads=num_heads)
    if name == "extra":
        return STRATEGIES[name](num_globals=_int(s, "num_globals", 0),
                                drop_output=s.drop_output, param_dtype=param_dtype)
    # sinks
    g = _int(s, "num_globals", 0)
    if g == 0 and not s.sink_logits:
        raise ValueError("strategy 'sinks' needs num_globals > 0 sink tokens or sink_logits=True")
    return STRATEGIES[name](num_globals=g, use_sink_logits=s.sink_logits,
                            param_dtype=param_dtype)


def _head(c, dtype, param_dtype) -> nn.Module:
    head = _choice(c, "head", HEADS)
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    if head == "classify":
        pooling = _choice(c, "pooling", POOLINGS)
        if c.arch == "perceiver":
            pooling = "cls"  # PerceiverModel pools before the head; see its docstring
        return ClassifyHead(_int(c, "num_classes"), pooling, **kw)
    if head == "token":
        return TokenHead(_int(c, "num_classes"), **kw)
    if head == "span":
        return SpanHead(**kw)
    return LMHead(c.vocab_size, **kw)


def _causal_lm(c, dtype, param_dtype) -> CausalLM:
    """arch='lm': attention_schedule 'full' is dense causal attention; 'global_local' a
    causal window of ``window`` keys back (W = window + 1 tokens with the query's own)."""
    if c.head != "lm":
        raise ValueError(f"arch='lm' needs head='lm', got head={c.head!r}")
    schedule = _choice(c, "attention_schedule", ("full", "global_local"))
    model = CausalLM(
        vocab_size=c.vocab_size, d_model=c.d_model, num_heads=c.num_heads,
        num_layers=c.num_layers, mlp_dim=c.mlp_dim,
        window=None if schedule == "full" else c.window + 1,
        num_sink_tokens=_int(c.lm, "num_sink_tokens", 0), sink_logits=c.lm.sink_logits,
        rope_base=float(c.lm.rope_base), dropout_rate=c.dropout, dtype=dtype,
        param_dtype=param_dtype)
    model._check()  # a bad field fails here, not at the first apply
    return model


def build_model(model_cfg: Any) -> nn.Module:
    """An unbound Linen model from a (full or partial) model config.

    Raises ValueError naming the field for any invalid or inconsistent value.
    The model's ``__call__(tokens, padding_mask, segment_ids=None, *,
    num_active_globals=None, deterministic=True)`` returns per ``head``:
    classify ``[B, C]``, token ``[B, T, C]``, span ``(start [B, T], end [B, T])``,
    lm ``[B, T, V]``.
    """
    c = _merged(model_cfg)
    arch = _choice(c, "arch", ARCHS)
    for name in ("vocab_size", "max_len", "d_model", "num_heads", "mlp_dim", "num_layers"):
        _int(c, name)
    _int(c, "num_segments", 0)
    _int(c, "window", 0)
    if c.d_model % c.num_heads:
        raise ValueError(f"d_model={c.d_model} is not divisible by num_heads={c.num_heads}")
    if not 0.0 <= c.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {c.dropout}")
    dtype = DTYPES[_choice(c, "dtype", DTYPES)]
    param_dtype = DTYPES[_choice(c, "param_dtype", DTYPES)]
    head_type = _choice(c, "head", HEADS)
    if head_type == "lm" and not c.causal:
        raise ValueError("head='lm' needs causal=True (otherwise every token sees its target)")
    if arch == "lm":
        return _causal_lm(c, dtype, param_dtype)
    head = _head(c, dtype, param_dtype)
    embedder = Embedder(c.vocab_size, c.max_len, c.d_model, c.num_segments, dtype, param_dtype)

    if arch == "perceiver":
        p = c.perceiver
        if head_type == "lm":
            raise ValueError("arch='perceiver' has no causal decoder: head='lm' is unsupported")
        if c.causal:
            raise ValueError("arch='perceiver' does not support causal=True")
        _int(p, "num_latents")
        _int(p, "num_latent_layers", 0)
        if c.d_model % _int(p, "num_cross_heads"):
            raise ValueError(
                f"d_model={c.d_model} is not divisible by perceiver.num_cross_heads="
                f"{p.num_cross_heads}")
        perceiver = Perceiver(
            num_latents=p.num_latents, d_model=c.d_model, num_heads=c.num_heads,
            mlp_dim=c.mlp_dim, num_latent_layers=p.num_latent_layers,
            share_weights=p.share_weights, num_cross_heads=p.num_cross_heads,
            dropout_rate=c.dropout, dtype=dtype, param_dtype=param_dtype)
        pooling = _choice(c, "pooling", POOLINGS) if head_type == "classify" else "cls"
        return PerceiverModel(embedder, perceiver, head, head_type=head_type, pooling=pooling,
                              dropout_rate=c.dropout)

    schedule = _choice(c, "attention_schedule", SCHEDULES)
    period = schedule_period(schedule, _int(c, "local_per_full"))
    if c.scan and c.num_layers % period:
        raise ValueError(
            f"scan=True needs num_layers={c.num_layers} to be a multiple of the schedule period "
            f"{period} (attention_schedule={schedule!r}, local_per_full={c.local_per_full})")
    strategy = build_strategy(c.strategy, num_layers=c.num_layers, num_heads=c.num_heads,
                              max_len=c.max_len, param_dtype=param_dtype)
    if head_type == "classify" and c.pooling == "globals" and strategy.capacity == 0:
        raise ValueError(
            f"pooling='globals' needs global tokens, but strategy {c.strategy.name!r} has none")
    window = strategy.window_override
    window = c.window if window is None else window
    encoder = Encoder(
        num_layers=c.num_layers, num_heads=c.num_heads, mlp_dim=c.mlp_dim, window=window,
        schedule=schedule, local_per_full=c.local_per_full, causal=c.causal,
        max_globals=strategy.capacity, block_size=strategy.block_size,
        global_projections=c.global_projections, sink_logits=strategy.sink_logits,
        rope=c.rope, dropout_rate=c.dropout, remat=c.remat, scan=c.scan, dtype=dtype,
        param_dtype=param_dtype)
    return GlobalTokenModel(embedder, strategy, encoder, head,
                            dropout_rate=c.dropout,
                            drop_global_output=getattr(strategy, "drop_output", True))
