"""Attention sinks and streaming (StreamingLLM Table 3, at character level).

Three causal LMs with RoPE trained with dense causal attention on Python
source text (the standard library, :mod:`globalattn.data.charlm`), then
evaluated as streams through a fixed cache of x initial tokens + (C - x)
recent ones, plus the sink metric (Gu et al. 2024). The whole reproduction::

    python -m experiments.reproduce sinks            # writes results/sinks.md
    python -m experiments.reproduce sinks --quick    # a 1-2 minute smoke run

Text from a trained variant::

    python -m experiments.generate --workdir=/tmp/globalattn_reproduce/sinks/sink_token \\
        --prompt='def main('

Args: '' (the full run), 'quick' (smaller model, fewer steps, shorter
streams), 'test' (tiny data and model, 3 steps). ``sweep()``: the three
variants (vanilla, one learnable sink token, zero sink = softmax-one).
"""
import ml_collections
from ml_collections import config_dict

from globalattn.train.config import base_config, check_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.config = "stdlib_t128"  # a globalattn.data.charlm config: T = 128 training context
    c.data.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets

    m = ml_collections.ConfigDict()  # the fields of globalattn.modules.lm.CausalLM
    m.vocab_size = 128
    m.d_model = 64
    m.num_heads = 4
    m.num_layers = 3
    m.mlp_dim = 256
    m.window = config_dict.placeholder(int)  # None: dense causal training, as StreamingLLM
    m.num_sink_tokens = 0
    m.sink_logits = "none"  # 'none' | 'learned' | 'zero'
    m.rope_base = 10000.0
    m.dropout_rate = 0.0
    c.model = m

    c.batch_size = 32
    c.num_train_steps = 800
    c.optim = base_config().optim  # AdamW, warmup + cosine, clipping (globalattn.train.optim)
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 80
    c.log_every = 100
    c.num_eval_batches = 8  # validation batches for the dense loss (0 = whole split)

    c.stream = ml_collections.ConfigDict()
    c.stream.cache_size = 64  # C = x initial + (C - x) recent tokens, as StreamingLLM's x + y
    c.stream.initial_tokens = (0, 1, 2, 4)
    c.stream.num_streams = 8  # contiguous held-out (test split) texts, streamed in parallel
    c.stream.length = 2048  # tokens per stream (> the window C and the training context T)

    c.sink_metric = ml_collections.ConfigDict()
    c.sink_metric.threshold = 0.3  # Gu et al. 2024: epsilon
    c.sink_metric.num_sequences = 64  # validation chunks of T tokens

    if arg == "quick":
        m.d_model = 32
        m.num_heads = 2
        m.num_layers = 2
        m.mlp_dim = 128
        c.num_train_steps = 150
        c.optim.warmup_steps = 20
        c.log_every = 50
        c.num_eval_batches = 2
        c.stream.cache_size = 32
        c.stream.num_streams = 4
        c.stream.length = 256
        c.sink_metric.num_sequences = 16
    elif arg == "test":
        c.data.config = "tiny"
        m.d_model = 16
        m.num_heads = 2
        m.num_layers = 2
        m.mlp_dim = 32
        c.batch_size = 8
        c.num_train_steps = 3
        c.optim.warmup_steps = 1
        c.log_every = 1
        c.num_eval_batches = 1
        c.stream.cache_size = 8
        c.stream.num_streams = 2
        c.stream.length = 40
        c.sink_metric.num_sequences = 4
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """StreamingLLM's three pre-training variants."""
    del arg
    return [
        {"name": "vanilla"},
        {"name": "sink_token", "model.num_sink_tokens": 1},
        {"name": "zero_sink", "model.sink_logits": "zero"},
    ]
