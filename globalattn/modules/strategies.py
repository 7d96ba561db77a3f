"""Global-token strategies: which tokens are global, behind one interface.

A strategy is a Linen module called as::

    gt = strategy(x, padding_mask, segment_ids, num_active=n, deterministic=d)

with ``x`` ``[B, T, D]`` token embeddings, ``padding_mask`` ``[B, T]`` bool
(True = real token) and optional ``segment_ids`` ``[B, T]`` int. It returns a
:class:`GlobalTokens`: the (possibly extended) embeddings ``[B, P + T, D]``, the
padding and global masks of the extended sequence, the ``[B, G]`` positions of
the global slots (what a head reads global outputs from), and, for BigBird, the
per-layer random blocks.

Capacity. Every strategy has a static capacity G (``strategy.capacity``) and a
traced ``num_active`` count (a scalar or ``[B]`` int, passed at apply time):
only the first ``num_active`` candidates, in position order, are global. For
strategies that add tokens (``extra``, ``sinks``) an inactive slot is also
padding, so it is masked out of rows and columns: a model with capacity 16 and
4 active globals computes exactly what a capacity-4 model computes. A concrete
``num_active`` outside ``[0, G]`` raises ValueError; a traced one is clipped
to ``[0, G]`` (it cannot be checked under jit).

Prepended tokens. ``extra`` and ``sinks`` prepend their P = G learned tokens
inside the model; every other strategy uses the data as-is (for ``cls``: the
data's own first real token, e.g. a [CLS] at position 0, is the global one).

Registry. :data:`STRATEGIES` maps each name to its module class; a class
reads its fields from a :class:`globalattn.modules.config.StrategyConfig`
(``validate`` / ``from_config`` / ``capacity_of``), and which tokens it makes
global comes from the selection functions of :mod:`globalattn.patterns` (the
one home of global-token selection). :func:`build_strategy` is a lookup.

Static facts the encoder needs (``capacity``, ``num_prepended``,
``window_override``, ``block_size``, ``sink_logits``) are properties of the
unbound module, so :func:`globalattn.modules.build_model` reads them at build
time and nothing shape-like is traced.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Type

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from globalattn import patterns
from globalattn.ops import validate as V
from globalattn.ops.dense import gather_global_positions, random_block_indices
from globalattn.sharding import EMBED

if TYPE_CHECKING:
    from globalattn.modules.config import ModelConfig, StrategyConfig

Array = jax.Array

__all__ = [
    "GlobalTokens",
    "GlobalStrategy",
    "NoGlobals",
    "ClsGlobal",
    "FirstGlobals",
    "FirstLastGlobals",
    "PeriodicGlobals",
    "TaskGlobals",
    "BigBirdGlobals",
    "ExtraTokens",
    "SinkTokens",
    "STRATEGIES",
    "RANDOM_POLICIES",
    "active_count",
    "build_strategy",
    "check_block_size",
    "register",
    "validate_strategy",
]

RANDOM_POLICIES = ("resample", "fixed")


@struct.dataclass
class GlobalTokens:
    """What a strategy hands to the encoder and the heads.

    Attributes:
      x: ``[B, P + T, D]`` embeddings, P prepended tokens first.
      padding_mask: bool ``[B, P + T]``; inactive prepended slots are False.
      global_mask: bool ``[B, P + T]``; never True on padding.
      positions: int32 ``[B, G]`` positions (in the extended sequence) of the
        global slots; slots past ``slot_valid`` hold 0.
      slot_valid: bool ``[B, G]``.
      random_blocks: int32 ``[L, B or 1, N, nb, r']`` key blocks per layer
        (BigBird: its window blocks then its random blocks), or None.
      num_prepended: static P; data position t is at ``P + t``.
    """

    x: Array
    padding_mask: Array
    global_mask: Array
    positions: Array
    slot_valid: Array
    random_blocks: Optional[Array] = None
    num_prepended: int = struct.field(pytree_node=False, default=0)

    def data(self, h: Array) -> Array:
        """``[B, P + T, ...]`` -> the data positions ``[B, T, ...]``."""
        return h[:, self.num_prepended:]

    def gather_globals(self, h: Array) -> Array:
        """``[B, P + T, D]`` -> global-slot outputs ``[B, G, D]`` (invalid slots 0)."""
        g = jnp.take_along_axis(h, self.positions[..., None], axis=1)
        return jnp.where(self.slot_valid[..., None], g, jnp.zeros((), h.dtype))


def active_count(num_active: Any, capacity: int, batch: int) -> Array:
    """``num_active`` (None, scalar or ``[B]``) -> int32 ``[B, 1]`` in ``[0, G]``."""
    if num_active is None:
        return jnp.full((batch, 1), capacity, jnp.int32)
    n = jnp.asarray(num_active)
    if not jnp.issubdtype(n.dtype, jnp.integer):
        raise ValueError(f"num_active_globals must be an integer, got dtype {n.dtype}")
    if n.ndim > 1 or (n.ndim == 1 and n.shape[0] not in (1, batch)):
        raise ValueError(
            f"num_active_globals must be a scalar or [B] = [{batch}], got shape {n.shape}")
    if V.is_concrete(n):
        lo, hi = int(jnp.min(n)), int(jnp.max(n))
        if lo < 0 or hi > capacity:
            raise ValueError(
                f"num_active_globals must lie in [0, capacity={capacity}], got {n.tolist()}")
    n = jnp.clip(n.astype(jnp.int32), 0, capacity)
    return jnp.broadcast_to(n.reshape(-1, 1), (batch, 1))


def _check_inputs(x: Array, padding_mask: Array) -> Tuple[int, int]:
    if x.ndim != 3:
        raise ValueError(f"strategy input x must be [B, T, D], got shape {x.shape}")
    B, T, _ = x.shape
    if padding_mask.shape != (B, T) or padding_mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask must be bool [B, T] = {(B, T)}, got {padding_mask.dtype} "
            f"{padding_mask.shape}")
    return B, T


def check_block_size(block_size: int, length: int, what: str = "sequence length T") -> None:
    """BigBird needs at least one whole block: ValueError naming both values otherwise."""
    if block_size > length:
        raise ValueError(f"bigbird block_size={block_size} exceeds {what}={length}")


def _int(s: "StrategyConfig", name: str, lo: int) -> int:
    v = getattr(s, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"model config strategy.{name} must be an int >= {lo}, got {v!r}")
    return v


STRATEGIES: Dict[str, Type["GlobalStrategy"]] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: adds a strategy to :data:`STRATEGIES` under ``name``."""
    def add(cls):
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        STRATEGIES[name] = cls
        return cls
    return add


def validate_strategy(s: "StrategyConfig", model: "ModelConfig") -> None:
    """Checks ``s`` for its strategy (ValueError naming the field and value)."""
    if s.name not in STRATEGIES:
        raise ValueError(f"model config name={s.name!r} not in {tuple(STRATEGIES)}")
    STRATEGIES[s.name].validate(s, model)


def build_strategy(model: Any) -> "GlobalStrategy":
    """The strategy module of a model config (a lookup in :data:`STRATEGIES`)."""
    from globalattn.modules.config import ModelConfig
    model = ModelConfig.from_config(model)
    return STRATEGIES[model.strategy.name].from_config(model.strategy, model)


class GlobalStrategy(nn.Module):
    """Base class. Subclasses implement :meth:`candidates` or override ``__call__``."""

    @property
    def capacity(self) -> int:
        raise NotImplementedError

    @property
    def num_prepended(self) -> int:
        return 0

    @property
    def window_override(self) -> Optional[Tuple[int, int]]:
        """A local window the strategy imposes instead of the model's (BigBird)."""
        return None

    @property
    def block_size(self) -> Optional[int]:
        return None

    @property
    def sink_logits(self) -> bool:
        return False

    def candidates(self, padding_mask: Array, segment_ids: Optional[Array]) -> Array:
        """bool ``[B, T]``: tokens that may be global, before ``num_active``."""
        raise NotImplementedError

    # ---- the registry interface (config -> module) --------------------------
    @classmethod
    def validate(cls, s: "StrategyConfig", model: "ModelConfig") -> None:
        """Checks the fields of ``s`` this strategy reads; none by default."""

    @classmethod
    def from_config(cls, s: "StrategyConfig", model: "ModelConfig") -> "GlobalStrategy":
        return cls()

    @classmethod
    def capacity_of(cls, s: "StrategyConfig") -> int:
        """The static capacity G of the module ``from_config(s, ...)`` builds."""
        return cls().capacity

    def __call__(self, x: Array, padding_mask: Array, segment_ids: Optional[Array] = None, *,
                 num_active: Any = None, deterministic: bool = True) -> GlobalTokens:
        B, T = _check_inputs(x, padding_mask)
        n = active_count(num_active, self.capacity, B)
        glob = patterns.keep_first(self.candidates(padding_mask, segment_ids) & padding_mask, n)
        return self._finish(x, padding_mask, glob)

    def _finish(self, x, padding_mask, glob, random_blocks=None) -> GlobalTokens:
        G = self.capacity
        if G == 0:
            B = x.shape[0]
            pos, valid = jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), bool)
        else:
            pos, valid, _ = gather_global_positions(glob, G)
        return GlobalTokens(x=x, padding_mask=padding_mask, global_mask=glob, positions=pos,
                            slot_valid=valid, random_blocks=random_blocks)


@register("none")
class NoGlobals(GlobalStrategy):
    """``none``: sliding window only (G = 0)."""

    @property
    def capacity(self) -> int:
        return 0

    def candidates(self, padding_mask, segment_ids):
        return jnp.zeros_like(padding_mask)


@register("cls")
class ClsGlobal(GlobalStrategy):
    """``cls``: the first real token (the data's [CLS], used as-is) is global. G = 1."""

    @property
    def capacity(self) -> int:
        return 1

    def candidates(self, padding_mask, segment_ids):
        return patterns.cls(padding_mask)


@register("first")
class FirstGlobals(GlobalStrategy):
    """``first``: the first ``num_globals`` real tokens are global. G = num_globals."""

    num_globals: int = 4

    @property
    def capacity(self) -> int:
        return self.num_globals

    def candidates(self, padding_mask, segment_ids):
        return padding_mask  # patterns.keep_first keeps the first n.

    @classmethod
    def validate(cls, s, model):
        _int(s, "num_globals", 1)

    @classmethod
    def from_config(cls, s, model):
        return cls(num_globals=s.num_globals)

    @classmethod
    def capacity_of(cls, s):
        return s.num_globals


@register("first_last")
class FirstLastGlobals(GlobalStrategy):
    """``first_last``: first and last real token (e.g. [CLS] and [SEP]). G = 2."""

    @property
    def capacity(self) -> int:
        return 2

    def candidates(self, padding_mask, segment_ids):
        return patterns.first_last(padding_mask)


@register("periodic")
class PeriodicGlobals(GlobalStrategy):
    """``periodic``: every ``period``-th position (0, k, 2k, ...) among real tokens.

    ``period=None`` spreads the G = ``num_globals`` globals evenly over the
    (padded) length T: ``period = ceil(T / G)``. With an explicit period, G must
    cover the sequence (``G * period >= T``), else ValueError: a pattern that
    silently stops part-way is a wrong answer.
    """

    num_globals: int = 4
    period: Optional[int] = None

    @property
    def capacity(self) -> int:
        return self.num_globals

    def candidates(self, padding_mask, segment_ids):
        T = padding_mask.shape[-1]
        G = self.num_globals
        if G == 0:
            return jnp.zeros_like(padding_mask)
        if self.period is None:
            k = -(-T // G)
        else:
            k = self.period
            if G * k < T:
                raise ValueError(
                    f"periodic strategy: num_globals={G} * period={k} = {G * k} does not "
                    f"cover the sequence length T={T}; raise num_globals to {-(-T // k)}")
        return patterns.periodic(padding_mask, k)

    @classmethod
    def validate(cls, s, model):
        if s.period is not None:
            _int(s, "period", 1)
        _int(s, "num_globals", 1)

    @classmethod
    def from_config(cls, s, model):
        return cls(num_globals=s.num_globals, period=s.period)

    @classmethod
    def capacity_of(cls, s):
        return s.num_globals


@register("task")
class TaskGlobals(GlobalStrategy):
    """``task``: every token of segment ``question_segment`` is global (QA questions).

    No assumption on separators: membership comes from ``segment_ids`` only.
    G = ``num_globals`` is the longest question the model accepts; a longer one
    is an error from the attention kernel (ValueError outside jit, NaN outputs
    for that example inside jit), never a silent truncation.
    """

    num_globals: int = 16
    question_segment: int = 0

    @property
    def capacity(self) -> int:
        return self.num_globals

    def candidates(self, padding_mask, segment_ids):
        if segment_ids is None:
            raise ValueError("strategy 'task' needs segment_ids [B, T] to find the question")
        return patterns.from_segments(segment_ids, (self.question_segment,), padding_mask)

    def __call__(self, x, padding_mask, segment_ids=None, *, num_active=None, deterministic=True):
        B, T = _check_inputs(x, padding_mask)
        glob = self.candidates(padding_mask, segment_ids)
        if num_active is not None:
            # Only an explicit count trims the question; capacity overflow stays loud.
            glob = patterns.keep_first(glob, active_count(num_active, self.capacity, B))
        return self._finish(x, padding_mask, glob)

    @classmethod
    def validate(cls, s, model):
        _int(s, "num_globals", 1)

    @classmethod
    def from_config(cls, s, model):
        return cls(num_globals=s.num_globals, question_segment=s.question_segment)

    @classmethod
    def capacity_of(cls, s):
        return s.num_globals


@register("bigbird")
class BigBirdGlobals(GlobalStrategy):
    """``bigbird`` (ITC): first and last block global, a block window, random blocks.

    Query block c attends key blocks ``c - w .. c + w`` (``window_blocks = 2w+1``,
    3 in BigBird) and ``num_random_blocks`` random blocks; tokens of the first
    block and of the block holding the last real token are global (G =
    2 * block_size). The window is exact blockwise, so the model's token
    ``window`` is not used (``window_override = (0, 0)``): the window blocks are
    passed to the kernel as extra per-block key blocks next to the random ones.

    Random blocks, one independent draw per layer: ``train_random`` /
    ``eval_random`` choose per mode (``deterministic`` False / True) between
    ``'resample'`` (key from the ``'random_blocks'`` rng collection, so a new
    pattern every step when the train loop folds the step into it) and
    ``'fixed'`` (``jax.random.key(eval_seed)``, the same pattern every call).
    """

    block_size: int = 8  # a field here; the base class's property (None) elsewhere
    num_random_blocks: int = 3
    window_blocks: int = 3
    train_random: str = "resample"
    eval_random: str = "fixed"
    eval_seed: int = 0
    per_example: bool = False
    num_layers: int = 1
    num_heads: int = 1

    @property
    def capacity(self) -> int:
        return 2 * self.block_size

    @property
    def window_override(self):
        return (0, 0)

    def candidates(self, padding_mask, segment_ids):
        return patterns.first_last_blocks(padding_mask, self.block_size)

    def draw_blocks(self, batch: int, seq_len: int, deterministic: bool) -> Array:
        """int32 ``[L, B or 1, N, nb, window_blocks + num_random_blocks]``."""
        policy = self.eval_random if deterministic else self.train_random
        if policy == "fixed":
            key = jax.random.key(self.eval_seed)
        else:
            if not self.has_rng("random_blocks"):
                raise ValueError(
                    "bigbird with random policy 'resample' needs the 'random_blocks' rng: "
                    "pass rngs={'random_blocks': key} to apply, or set the policy to 'fixed'")
            key = self.make_rng("random_blocks")
        bs, w = self.block_size, self.window_blocks // 2
        nb = -(-seq_len // bs)
        bb = batch if self.per_example else 1
        draw = lambda k: random_block_indices(  # noqa: E731
            k, seq_len=seq_len, block_size=bs, num_random_blocks=self.num_random_blocks,
            batch_size=bb, num_heads=self.num_heads, exclude_window_blocks=w,
            exclude_blocks=(0, nb - 1))
        rand = jax.vmap(draw)(jax.random.split(key, self.num_layers))
        win = jnp.clip(jnp.arange(nb)[:, None] + jnp.arange(-w, w + 1)[None, :], 0, nb - 1)
        win = jnp.broadcast_to(win, rand.shape[:-1] + (2 * w + 1,)).astype(jnp.int32)
        return jnp.concatenate([win, rand], axis=-1)

    def __call__(self, x, padding_mask, segment_ids=None, *, num_active=None, deterministic=True):
        B, T = _check_inputs(x, padding_mask)
        check_block_size(self.block_size, T)
        n = active_count(num_active, self.capacity, B)
        glob = patterns.keep_first(self.candidates(padding_mask, segment_ids) & padding_mask, n)
        return self._finish(x, padding_mask, glob, self.draw_blocks(B, T, deterministic))

    @classmethod
    def validate(cls, s, model):
        check_block_size(_int(s, "block_size", 1), model.max_len, "max_len")
        if _int(s, "window_blocks", 1) % 2 == 0:
            raise ValueError(f"bigbird window_blocks must be odd, got {s.window_blocks}")
        _int(s, "num_random_blocks", 0)
        for field in ("train_random", "eval_random"):
            if getattr(s, field) not in RANDOM_POLICIES:
                raise ValueError(f"model config strategy.{field}={getattr(s, field)!r} not in "
                                 f"{RANDOM_POLICIES}")

    @classmethod
    def from_config(cls, s, model):
        return cls(block_size=s.block_size, num_random_blocks=s.num_random_blocks,
                   window_blocks=s.window_blocks, train_random=s.train_random,
                   eval_random=s.eval_random, eval_seed=s.eval_seed,
                   per_example=s.per_example_random, num_layers=model.num_layers,
                   num_heads=model.num_heads)

    @classmethod
    def capacity_of(cls, s):
        return 2 * s.block_size


@register("extra")
class ExtraTokens(GlobalStrategy):
    """``extra`` (ETC global tokens, memory tokens, registers): G learned tokens prepended.

    The tokens carry no position embedding, so data positions mean the same for
    every capacity. Slot g is active iff ``g < num_active``; inactive slots are
    padding. ``drop_output`` asks the model to return only data positions from
    ``encode`` (heads always read data positions, and 'globals' pooling the slots).
    """

    num_globals: int = 4
    drop_output: bool = True
    param_dtype: Any = jnp.float32

    @property
    def capacity(self) -> int:
        return self.num_globals

    @property
    def num_prepended(self) -> int:
        return self.num_globals

    @nn.compact
    def __call__(self, x, padding_mask, segment_ids=None, *, num_active=None, deterministic=True):
        B, T = _check_inputs(x, padding_mask)
        G, D = self.num_globals, x.shape[-1]
        table = self.param("global_tokens", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, EMBED)), (G, D), self.param_dtype)
        n = active_count(num_active, G, B)
        slot_on = jnp.arange(G)[None, :] < n  # [B, G]
        xe = jnp.concatenate([jnp.broadcast_to(table.astype(x.dtype), (B, G, D)), x], axis=1)
        pad = jnp.concatenate([slot_on, padding_mask], axis=1)
        glob = jnp.concatenate([slot_on, jnp.zeros_like(padding_mask)], axis=1)
        pos = jnp.broadcast_to(jnp.arange(G, dtype=jnp.int32), (B, G))
        return GlobalTokens(x=xe, padding_mask=pad, global_mask=glob, positions=pos,
                            slot_valid=slot_on, num_prepended=G)

    @classmethod
    def validate(cls, s, model):
        _int(s, "num_globals", 0)

    @classmethod
    def from_config(cls, s, model):
        return cls(num_globals=s.num_globals, drop_output=s.drop_output,
                   param_dtype=model.jnp_param_dtype)

    @classmethod
    def capacity_of(cls, s):
        return s.num_globals


@register("sinks")
class SinkTokens(ExtraTokens):
    """``sinks`` (StreamingLLM): G learned sink tokens prepended (global, so every
    query sees them, also under causal masking) and/or, with ``use_sink_logits``,
    a learned per-head sink logit in every attention layer (an extra softmax
    column with value 0; softmax-one at its init value 0). Sinks are always
    dropped from the output.
    """

    num_globals: int = 1
    use_sink_logits: bool = False
    drop_output: bool = True

    @property
    def sink_logits(self) -> bool:
        return self.use_sink_logits

    @classmethod
    def validate(cls, s, model):
        if _int(s, "num_globals", 0) == 0 and not s.sink_logits:
            raise ValueError("strategy 'sinks' needs num_globals > 0 sink tokens or "
                             "sink_logits=True")

    @classmethod
    def from_config(cls, s, model):
        return cls(num_globals=s.num_globals, use_sink_logits=s.sink_logits,
                   param_dtype=model.jnp_param_dtype)
