"""The model configuration: one ml_collections schema, one frozen config built from it.

* :func:`default_model_config` -- every field of ``config.model`` with its
  default, as a locked ``ConfigDict`` (what experiment configs override).
* :class:`ModelConfig` -- that config as a frozen dataclass, built and
  validated ONCE (:meth:`ModelConfig.from_config`); every field check lives
  in its ``__post_init__``, so a ``ModelConfig`` that exists is valid.
* :class:`BlockConfig` -- what one transformer layer needs (attention + MLP),
  resolved from a ModelConfig and its strategy by :meth:`ModelConfig.block`;
  the encoder passes it down to every block and attention module unchanged.

``window`` means the same thing everywhere in the modules: the local window
RADIUS, an int ``w`` (query i sees keys ``i - w .. i + w``) or a
``(left, right)`` pair (keys ``i - left .. i + right``); see :data:`Window`.
Shapes: B batch, T length, N heads, H head dim, D model dim.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from globalattn.ops.dense import Window

__all__ = ["ARCHS", "DTYPES", "HEADS", "POOLINGS", "SCHEDULES", "SINK_LOGITS", "BlockConfig",
           "LMConfig", "ModelConfig", "PerceiverConfig", "StrategyConfig", "Window", "default_model_config",
           "layer_kinds", "schedule_period"]

ARCHS = ("encoder", "perceiver", "lm")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
HEADS = ("classify", "token", "span", "lm")
POOLINGS = ("cls", "globals", "mean")
SCHEDULES = ("global_local", "full", "interleaved")
# Attention sinks as a softmax column: none, a learned per-head logit, or a fixed 0 logit.
SINK_LOGITS = ("none", "learned", "zero")


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

    p = ml_collections.ConfigDict()
    p.num_latents = 32  # capacity; num_active_globals selects how many are active
    p.num_latent_layers = 2
    p.share_weights = False  # one latent block reused num_latent_layers times
    p.num_cross_heads = 1
    c.perceiver = p

    lm = ml_collections.ConfigDict()  # arch='lm' only (globalattn.modules.lm.CausalLM)
    lm.num_sink_tokens = 0  # learned sink tokens prepended to every sequence / stream
    lm.sink_logits = "none"  # 'none' | 'learned' | 'zero' (softmax-one)
    lm.rope_base = 10000.0
    c.lm = lm
    c.lock()
    return c


# ---------------------------------------------------------------------------------------
# Checks shared by the dataclasses below (each names the field and the value).


def _int(value: Any, name: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"model config {name} must be an int >= {lo}, got {value!r}")
    return int(value)


def _choice(value: Any, name: str, options) -> Any:
    if value not in options:
        raise ValueError(f"model config {name}={value!r} not in {tuple(options)}")
    return value


def layer_kinds(schedule: str, num_layers: int, local_per_full: int = 3) -> Tuple[str, ...]:
    """Attention kind of every layer, e.g. interleaved k=2, L=6 -> (gl, gl, full) * 2."""
    if schedule not in SCHEDULES:
        raise ValueError(f"attention_schedule {schedule!r} not in {SCHEDULES}")
    if schedule == "interleaved":
        if local_per_full < 1:
            raise ValueError(f"local_per_full must be >= 1, got {local_per_full}")
        p = local_per_full + 1
        return tuple("full" if (i + 1) % p == 0 else "global_local" for i in range(num_layers))
    return (schedule,) * num_layers


def schedule_period(schedule: str, local_per_full: int) -> int:
    """Layers in one repeat of the schedule (the body of a layer scan)."""
    return local_per_full + 1 if schedule == "interleaved" else 1


# ---------------------------------------------------------------------------------------
# The frozen configs.


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """``config.model.strategy``: which tokens are global (see :mod:`.strategies`).

    Each strategy reads the fields it needs; the registry entry of ``name``
    validates them (:func:`globalattn.modules.strategies.validate_strategy`).
    """

    name: str = "cls"
    num_globals: int = 4
    period: Optional[int] = None
    question_segment: int = 0
    block_size: int = 8
    num_random_blocks: int = 3
    window_blocks: int = 3
    train_random: str = "resample"
    eval_random: str = "fixed"
    eval_seed: int = 0
    per_example_random: bool = False
    drop_output: bool = True
    sink_logits: bool = False


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """``config.model.perceiver``: the latent array of ``arch='perceiver'``."""

    num_latents: int = 32
    num_latent_layers: int = 2
    share_weights: bool = False
    num_cross_heads: int = 1


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """``config.model.lm``: the causal LM of ``arch='lm'`` (RoPE, sinks, streaming)."""

    num_sink_tokens: int = 0
    sink_logits: str = "none"
    rope_base: float = 10000.0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One pre-LN transformer layer: self-attention and an MLP.

    Attributes:
      num_heads: N.
      mlp_dim: hidden width of the MLP.
      head_dim: H (None = D // N).
      window: local window radius (see :data:`Window`); ``(0, 0)`` for BigBird,
        whose window is made of key blocks.
      causal: every pair needs ``j <= i``.
      max_globals: static global capacity G passed to the kernel (0 = none).
      block_size: BigBird block size (with random blocks at call time), or None.
      global_projections: Longformer's separate q/k/v for global rows.
      sink_logits: one of :data:`SINK_LOGITS`.
      rope: rotate queries and keys by position (RoPE).
      dropout_rate: residual branches and the MLP hidden layer.
      dtype, param_dtype: computation and parameter dtypes (softmax is float32).
    """

    num_heads: int
    mlp_dim: int = 0
    head_dim: Optional[int] = None
    window: Window = 0
    causal: bool = False
    max_globals: int = 0
    block_size: Optional[int] = None
    global_projections: bool = False
    sink_logits: str = "none"
    rope: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        _choice(self.sink_logits, "sink_logits", SINK_LOGITS)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``config.model`` as a frozen, validated dataclass (fields: :func:`default_model_config`).

    Build it with :meth:`from_config`; constructing it directly validates too.
    Raises ValueError naming the field for any invalid or inconsistent value.
    """

    arch: str = "encoder"
    vocab_size: int = 256
    max_len: int = 128
    rope: bool = False
    num_segments: int = 2
    d_model: int = 64
    num_heads: int = 4
    mlp_dim: int = 256
    num_layers: int = 2
    dropout: float = 0.1
    window: int = 8
    causal: bool = False
    attention_schedule: str = "global_local"
    local_per_full: int = 3
    global_projections: bool = False
    head: str = "classify"
    num_classes: int = 10
    pooling: str = "cls"
    remat: bool = False
    scan: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    strategy: StrategyConfig = StrategyConfig()
    perceiver: PerceiverConfig = PerceiverConfig()
    lm: LMConfig = LMConfig()

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelConfig":
        """From a ModelConfig (returned as is) or a full or partial ConfigDict / dict,
        laid over :func:`default_model_config`; unknown fields are errors."""
        if isinstance(cfg, ModelConfig):
            return cfg
        base = default_model_config()

        def merge(dst: ml_collections.ConfigDict, src: Mapping, prefix: str):
            for key, val in src.items():
                if key not in dst:
                    raise ValueError(f"unknown model config field {prefix + key!r}; valid "
                                     f"fields: {sorted(dst.keys())}")
                if isinstance(dst[key], ml_collections.ConfigDict):
                    if not isinstance(val, (Mapping, ml_collections.ConfigDict)):
                        raise ValueError(f"model config field {prefix + key!r} must be a mapping")
                    merge(dst[key], val, prefix + key + ".")
                else:
                    try:
                        dst[key] = val
                    except TypeError as e:
                        raise ValueError(f"model config field {prefix + key!r}: {e}") from None

        merge(base, cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg, "")
        d = base.to_dict()
        return cls(**{**d, "strategy": StrategyConfig(**d["strategy"]),
                      "perceiver": PerceiverConfig(**d["perceiver"]),
                      "lm": LMConfig(**d["lm"])})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation: every model-config check, once ------------------------
    def __post_init__(self):
        from globalattn.modules import strategies  # the registry validates its own fields

        _choice(self.arch, "arch", ARCHS)
        for name in ("vocab_size", "max_len", "d_model", "num_heads", "mlp_dim", "num_layers"):
            _int(getattr(self, name), name)
        _int(self.num_segments, "num_segments", 0)
        _int(self.window, "window", 0)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _choice(self.dtype, "dtype", DTYPES)
        _choice(self.param_dtype, "param_dtype", DTYPES)
        _choice(self.head, "head", HEADS)
        if self.head == "classify":
            _choice(self.pooling, "pooling", POOLINGS)
        if self.head in ("classify", "token"):
            _int(self.num_classes, "num_classes")
        if self.head == "lm" and not self.causal:
            raise ValueError("head='lm' needs causal=True (otherwise every token sees its target)")
        if self.arch == "perceiver":
            self._check_perceiver()
            return
        if self.arch == "lm":
            self._check_lm()
            return
        schedule = _choice(self.attention_schedule, "attention_schedule", SCHEDULES)
        period = schedule_period(schedule, _int(self.local_per_full, "local_per_full"))
        if self.scan and self.num_layers % period:
            raise ValueError(
                f"scan=True needs num_layers={self.num_layers} to be a multiple of the "
                f"schedule period {period} (attention_schedule={schedule!r}, "
                f"local_per_full={self.local_per_full})")
        strategies.validate_strategy(self.strategy, self)
        if self.head == "classify" and self.pooling == "globals" and self.capacity == 0:
            raise ValueError(f"pooling='globals' needs global tokens, but strategy "
                             f"{self.strategy.name!r} has none")

    def _check_lm(self) -> None:
        if self.head != "lm":
            raise ValueError(f"arch='lm' needs head='lm', got head={self.head!r}")
        _choice(self.attention_schedule, "attention_schedule", ("full", "global_local"))
        _int(self.lm.num_sink_tokens, "lm.num_sink_tokens", 0)
        _choice(self.lm.sink_logits, "lm.sink_logits", SINK_LOGITS)
        if not float(self.lm.rope_base) > 1.0:
            raise ValueError(f"model config lm.rope_base must be > 1, got {self.lm.rope_base!r}")

    def _check_perceiver(self) -> None:
        p = self.perceiver
        if self.head == "lm":
            raise ValueError("arch='perceiver' has no causal decoder: head='lm' is unsupported")
        if self.causal:
            raise ValueError("arch='perceiver' does not support causal=True")
        if self.rope:
            raise ValueError("arch='perceiver' does not support rope=True (latents have no "
                             "positions; its inputs use learned absolute positions)")
        _int(p.num_latents, "perceiver.num_latents")
        _int(p.num_latent_layers, "perceiver.num_latent_layers", 0)
        if self.d_model % _int(p.num_cross_heads, "perceiver.num_cross_heads"):
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"perceiver.num_cross_heads={p.num_cross_heads}")

    # ---- derived values ------------------------------------------------------
    @property
    def jnp_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    @property
    def capacity(self) -> int:
        """Static global capacity G: the strategy's slots, or the Perceiver's latents."""
        if self.arch == "perceiver":
            return self.perceiver.num_latents
        if self.arch == "lm":
            return self.lm.num_sink_tokens
        from globalattn.modules import strategies
        return strategies.STRATEGIES[self.strategy.name].capacity_of(self.strategy)

    @property
    def kinds(self) -> Tuple[str, ...]:
        """Attention kind of every encoder layer."""
        return layer_kinds(self.attention_schedule, self.num_layers, self.local_per_full)

    @property
    def scan_period(self) -> int:
        return schedule_period(self.attention_schedule, self.local_per_full)

    def block(self, strategy: Any) -> BlockConfig:
        """The encoder layers' :class:`BlockConfig`, given the model's built strategy.

        The window is resolved here, once: the strategy's (BigBird's blockwise
        ``(0, 0)``) or else ``self.window``.
        """
        window = strategy.window_override
        return BlockConfig(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            window=self.window if window is None else window, causal=self.causal,
            max_globals=strategy.capacity, block_size=strategy.block_size,
            global_projections=self.global_projections,
            sink_logits="learned" if strategy.sink_logits else "none", rope=self.rope,
            dropout_rate=self.dropout, dtype=self.jnp_dtype, param_dtype=self.jnp_param_dtype)

    def latent_block(self) -> BlockConfig:
        """The Perceiver's latent self-attention layers: full attention, no extras."""
        return BlockConfig(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                           dropout_rate=self.dropout, dtype=self.jnp_dtype,
                           param_dtype=self.jnp_param_dtype)
