"""The RoBERTa-style post-LayerNorm encoder shared by pretrained Longformer and BigBird.

Everything here mirrors the Hugging Face PyTorch modules those checkpoints were
trained with, so that a converted checkpoint computes the same function:

* :class:`Embeddings` -- word + learned absolute position + token type
  embeddings, then LayerNorm. Positions are ``'roberta'`` (Longformer: real
  tokens count from ``pad_token_id + 1``, padding tokens sit at ``pad_token_id``)
  or ``'absolute'`` (BigBird: ``0 .. T-1``).
* :class:`Layer` -- post-LN block: ``LN(x + Attn(x))`` then ``LN(h + W2 act(W1 h))``;
  the self-attention is the architecture's module (it projects and calls
  :func:`globalattn.global_local_attention`).
* :class:`Encoder` -- embeddings and the layer stack; :class:`Pooler`,
  :class:`ClassificationHead`, :class:`QuestionAnsweringHead` -- the task heads.

Parameter names follow the Hugging Face module tree (``embeddings/word_embeddings``,
``encoder/layer_3/attention/self/query``, ...) so the checkpoint map in
:mod:`globalattn.models.hf` is one line per tensor. Parameters carry logical
axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``) for sharding.

Shapes: B batch, T length, D hidden size, N heads, H = D / N head dim.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["ACTIVATIONS", "PretrainedConfig", "Embeddings", "Layer", "Encoder", "Pooler",
           "ClassificationHead", "QuestionAnsweringHead", "dense", "heads_in", "heads_out",
           "roberta_positions"]

ARCHS = ("longformer", "bigbird")
POSITIONS = ("roberta", "absolute")
HEADS = (None, "classify", "qa")
BIGBIRD_ATTENTION = ("block_sparse", "original_full")
RANDOM_POLICIES = ("resample", "fixed")

# Hugging Face activation names -> jax. 'gelu' is the exact (erf) GELU; the
# tanh approximations go by several names there.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """Everything that fixes a pretrained encoder's function (hashable, frozen).

    Built from a Hugging Face ``config.json`` by
    :func:`globalattn.models.hf.config_from_hf`; validated once here.

    Attributes:
      arch: ``'longformer'`` or ``'bigbird'``.
      vocab_size, hidden_size (D), num_layers, num_heads (N), intermediate_size,
      hidden_act (a key of :data:`ACTIVATIONS`), layer_norm_eps,
      max_position_embeddings, type_vocab_size, pad_token_id, sep_token_id:
        as in the Hugging Face config.
      positions: ``'roberta'`` or ``'absolute'`` (see :class:`Embeddings`).
      rescale_embeddings: multiply word embeddings by sqrt(D) (BigBird option).
      use_bias: biases on the q/k/v projections (BigBird option; Longformer True).
      attention_windows: Longformer, per layer, the Hugging Face *total* window
        w (even); query i sees keys ``i - w/2 .. i + w/2``.
      attention_type: BigBird, ``'block_sparse'`` or ``'original_full'``.
      block_size, num_random_blocks: BigBird block-sparse pattern.
      train_random, eval_random, eval_seed: BigBird random-block policy when
        no explicit ``random_blocks`` are passed: ``'resample'`` draws from the
        ``'random_blocks'`` rng collection, ``'fixed'`` from
        ``jax.random.key(eval_seed)``; chosen by ``deterministic`` False / True.
      pooler: the model has a pooler (dense + tanh on token 0).
      head: None, ``'classify'`` (``num_labels`` logits from token 0) or
        ``'qa'`` (start / end logits per token).
      classifier_act: activation inside the classification head (``'tanh'`` for
        Longformer, the hidden activation for BigBird).
      max_globals: static global capacity G for the attention core (required
        under jit when global masks are traced; None = the largest per-example
        count, computed from a concrete mask).
      dropout: hidden dropout rate (embeddings, residual branches, heads). The
        attention core has no attention-probability dropout.
      remat: rematerialise each layer in the backward pass (long inputs on accelerators).
      dtype, param_dtype: ``'float32'`` / ``'bfloat16'`` / ``'float16'``.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 4098
    type_vocab_size: int = 1
    pad_token_id: int = 1
    sep_token_id: Optional[int] = None
    positions: str = "roberta"
    rescale_embeddings: bool = False
    use_bias: bool = True
    attention_windows: Tuple[int, ...] = ()
    attention_type: str = "block_sparse"
    block_size: int = 64
    num_random_blocks: int = 3
    train_random: str = "resample"
    eval_random: str = "fixed"
    eval_seed: int = 0
    pooler: bool = False
    head: Optional[str] = None
    num_labels: int = 2
    classifier_act: str = "tanh"
    max_globals: Optional[int] = None
    dropout: float = 0.0
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        errors = []
        if self.arch not in ARCHS:
            errors.append(f"arch={self.arch!r} not in {ARCHS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "block_size", "num_labels"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                errors.append(f"{name}={v!r} must be a positive int")
        if isinstance(self.hidden_size, int) and isinstance(self.num_heads, int) and \
                self.num_heads > 0 and self.hidden_size % self.num_heads:
            errors.append(f"hidden_size={self.hidden_size} is not divisible by "
                          f"num_heads={self.num_heads}")
        for name in ("hidden_act", "classifier_act"):
            if getattr(self, name) not in ACTIVATIONS:
                errors.append(f"{name}={getattr(self, name)!r} not in {sorted(ACTIVATIONS)}")
        if self.positions not in POSITIONS:
            errors.append(f"positions={self.positions!r} not in {POSITIONS}")
        if self.head not in HEADS:
            errors.append(f"head={self.head!r} not in {HEADS}")
        if self.dtype not in _DTYPES or self.param_dtype not in _DTYPES:
            errors.append(f"dtype={self.dtype!r} / param_dtype={self.param_dtype!r} must be in "
                          f"{sorted(_DTYPES)}")
        if self.arch == "longformer":
            if len(self.attention_windows) != self.num_layers:
                errors.append(f"attention_windows has {len(self.attention_windows)} entries for "
                              f"num_layers={self.num_layers}")
            bad = [w for w in self.attention_windows if not isinstance(w, int) or w < 2 or w % 2]
            if bad:
                errors.append(f"attention_windows entries must be even ints >= 2, got {bad}")
        if self.arch == "bigbird":
            if self.attention_type not in BIGBIRD_ATTENTION:
                errors.append(f"attention_type={self.attention_type!r} not in {BIGBIRD_ATTENTION}")
            if not isinstance(self.num_random_blocks, int) or self.num_random_blocks < 0:
                errors.append(f"num_random_blocks={self.num_random_blocks!r} must be an int >= 0")
            for name in ("train_random", "eval_random"):
                if getattr(self, name) not in RANDOM_POLICIES:
                    errors.append(f"{name}={getattr(self, name)!r} not in {RANDOM_POLICIES}")
        if self.max_globals is not None and (not isinstance(self.max_globals, int)
                                             or self.max_globals < 0):
            errors.append(f"max_globals={self.max_globals!r} must be None or an int >= 0")
        if not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout} must be in [0, 1)")
        if errors:
            raise ValueError("invalid PretrainedConfig: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    @property
    def jnp_param_dtype(self) -> Any:
        return _DTYPES[self.param_dtype]

    def replace(self, **kw) -> "PretrainedConfig":
        return dataclasses.replace(self, **kw)


_INIT = nn.initializers.normal(0.02)  # BERT's init; a converted checkpoint overwrites it


def dense(cfg: PretrainedConfig, features: int, axes: Tuple[Optional[str], Optional[str]],
          name: str, use_bias: bool = True) -> nn.Dense:
    """``[..., in] -> [..., features]`` with logical axes ``axes`` on the kernel."""
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.jnp_dtype,
                    param_dtype=cfg.jnp_param_dtype,
                    kernel_init=nn.with_logical_partitioning(_INIT, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
                    name=name)


def heads_in(cfg: PretrainedConfig, name: str, use_bias: bool = True) -> nn.DenseGeneral:
    """``[B, T, D] -> [B, T, N, H]`` (q/k/v projection)."""
    return nn.DenseGeneral((cfg.num_heads, cfg.head_dim), axis=-1, use_bias=use_bias,
                           dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                           kernel_init=nn.with_logical_partitioning(
                               _INIT, ("embed", "heads", "kv")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  ("heads", "kv")),
                           name=name)


def heads_out(cfg: PretrainedConfig, name: str) -> nn.DenseGeneral:
    """``[B, T, N, H] -> [B, T, D]`` (attention output projection)."""
    return nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), dtype=cfg.jnp_dtype,
                           param_dtype=cfg.jnp_param_dtype,
                           kernel_init=nn.with_logical_partitioning(
                               _INIT, ("heads", "kv", "embed")),
                           bias_init=nn.with_logical_partitioning(
                               nn.initializers.zeros, ("embed",)),
                           name=name)


def layer_norm(cfg: PretrainedConfig, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form loses digits).
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, use_fast_variance=False, dtype=cfg.jnp_dtype,
                        param_dtype=cfg.jnp_param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        name=name)


def roberta_positions(padding_mask: Array, pad_token_id: int) -> Array:
    """RoBERTa position ids ``[B, T]``: the k-th real token (k = 1, 2, ..) is at
    ``pad_token_id + k``, padding at ``pad_token_id`` (fairseq's make_positions,
    with "real" given by the mask instead of the token id)."""
    m = padding_mask.astype(jnp.int32)
    return jnp.cumsum(m, axis=1) * m + pad_token_id


class Embeddings(nn.Module):
    """``input_ids [B, T]``, ``token_type_ids [B, T]``, ``position_ids [B, T]`` -> ``[B, T, D]``."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, position_ids: Array,
                 deterministic: bool = True) -> Array:
        cfg = self.cfg
        D = cfg.hidden_size

        def embed(n, axes, name):
            return nn.Embed(n, D, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
                            embedding_init=nn.with_logical_partitioning(_INIT, axes), name=name)

        x = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        if cfg.rescale_embeddings:
            x = x * (D ** 0.5)
        x = x + embed(cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = x + embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(
            position_ids)
        x = layer_norm(cfg, "LayerNorm")(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class AttentionBlock(nn.Module):
    """``LN(x + Dropout(W_o Attn(x)))``: Hugging Face's ``attention.{self,output}``."""

    cfg: PretrainedConfig
    attention: Callable[..., nn.Module]  # the architecture's self-attention class
    layer: int

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array],
                 random_blocks: Optional[Array], deterministic: bool) -> Array:
        cfg = self.cfg
        h = self.attention(cfg=cfg, layer=self.layer, name="self")(
            x, padding_mask, global_mask, random_blocks)  # [B, T, N, H]
        return OutputProjection(cfg, name="output")(h, x, deterministic)


class OutputProjection(nn.Module):
    """``LN(residual + Dropout(W_o h))`` with ``h`` the ``[B, T, N, H]`` attention output."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, h: Array, residual: Array, deterministic: bool) -> Array:
        y = heads_out(self.cfg, "dense")(h)
        y = nn.Dropout(self.cfg.dropout)(y, deterministic=deterministic)
        return layer_norm(self.cfg, "LayerNorm")(y + residual)


class FeedForward(nn.Module):
    """``LN(x + Dropout(W2 act(W1 x)))``: Hugging Face's ``intermediate`` + ``output``."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.cfg
        h = ACTIVATIONS[cfg.hidden_act](
            dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        y = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return layer_norm(cfg, "output_LayerNorm")(y + x)


class Layer(nn.Module):
    """One post-LN encoder layer, ``[B, T, D] -> [B, T, D]``."""

    cfg: PretrainedConfig
    attention: Callable[..., nn.Module]
    layer: int

    @nn.compact
    def __call__(self, x: Array, padding_mask: Array, global_mask: Optional[Array],
                 random_blocks: Optional[Array], deterministic: bool) -> Array:
        h = AttentionBlock(self.cfg, self.attention, self.layer, name="attention")(
            x, padding_mask, global_mask, random_blocks, deterministic)
        y = FeedForward(self.cfg, name="ffn")(h, deterministic)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """Embeddings and ``num_layers`` post-LN layers.

    ``__call__(input_ids, token_type_ids, position_ids, padding_mask,
    global_mask, random_blocks, deterministic)``: ids ``[B, T]`` int, masks
    ``[B, T]`` bool (``global_mask`` may be None), ``random_blocks`` None or
    int ``[L, B|1, N, nb, r]`` (one per layer) -> ``[B, T, D]``.
    """

    cfg: PretrainedConfig
    attention: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, padding_mask, global_mask,
                 random_blocks, deterministic: bool = True) -> Array:
        cfg = self.cfg
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, position_ids,
                                               deterministic)
        # Argument 5 (self = 0) of Layer.__call__ is `deterministic`, a Python bool.
        layer_cls = nn.remat(Layer, static_argnums=(5,)) if cfg.remat else Layer
        for i in range(cfg.num_layers):
            rb = None if random_blocks is None else random_blocks[i]
            x = layer_cls(cfg, self.attention, i, name=f"layer_{i}")(
                x, padding_mask, global_mask, rb, deterministic)
        return x


class Pooler(nn.Module):
    """``tanh(W h[:, 0])``: ``[B, T, D] -> [B, D]``."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, h: Array) -> Array:
        return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, ("embed", "mlp"), "dense")(h[:, 0]))


class ClassificationHead(nn.Module):
    """``out_proj(act(dense(h[:, 0])))`` with dropout before each: ``[B, T, D] -> [B, C]``."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, h: Array, deterministic: bool = True) -> Array:
        cfg = self.cfg
        x = nn.Dropout(cfg.dropout)(h[:, 0], deterministic=deterministic)
        x = ACTIVATIONS[cfg.classifier_act](
            dense(cfg, cfg.hidden_size, ("embed", "mlp"), "dense")(x))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        return dense(cfg, cfg.num_labels, ("mlp", None), "out_proj")(x)


class QuestionAnsweringHead(nn.Module):
    """Start / end logits ``([B, T], [B, T])`` from ``[B, T, D]``."""

    cfg: PretrainedConfig

    @nn.compact
    def __call__(self, h: Array) -> Tuple[Array, Array]:
        logits = dense(self.cfg, 2, ("embed", None), "qa_outputs")(h)
        return logits[..., 0], logits[..., 1]
