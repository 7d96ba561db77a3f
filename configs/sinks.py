"""Attention sinks and streaming: StreamingLLM's Table 3 at character level.

Three causal LMs with RoPE (``model.arch='lm'``) trained with dense causal
attention on Python source text (``data.name='charlm'``, the standard library)
by the same ``train_and_evaluate`` as every model -- vanilla, one learnable sink
token, zero sink (softmax-one) -- then evaluated as streams through a fixed
cache of x initial tokens + (C - x) recent ones, plus the sink metric (Gu et al.
2024) on dense forwards.

    python -m experiments.reproduce sinks --out=results   # -> results/sinks.md (9 runs)
    python -m experiments.reproduce sinks --quick         # smoke run (a few minutes)
    python -m experiments.train --config=configs/sinks.py --workdir=/tmp/sinks_vanilla

Text from a trained variant (any workdir of this config)::

    python -m experiments.generate --workdir=/tmp/globalattn_reproduce/sinks_quick/sink_token/seed0 \\
        --prompt='def main('

Args: '' (the full run), 'quick' (smaller model, fewer steps, shorter streams),
'test' (tiny data and model, 3 steps). ``sweep()``: the three variants.
"""
import ml_collections

from globalattn.train.config import base_config, check_arg

MEASURE = "lm_streaming"
TITLE = "Attention sinks and streaming: StreamingLLM's Table 3 at character level"
VARIANTS = {"vanilla": "vanilla", "sink_token": "1 learnable sink token",
            "zero_sink": "zero sink (softmax-one)"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "charlm"
    c.data.config = "stdlib_t128"  # T = 128 training context
    c.data.final_eval_splits = ("validation",)  # the test split is streamed instead
    m = c.model
    m.arch = "lm"
    m.head = "lm"
    m.causal = True
    m.attention_schedule = "full"  # dense causal training, as StreamingLLM
    m.d_model = 64
    m.num_heads = 4
    m.num_layers = 3
    m.mlp_dim = 256
    m.dropout = 0.0
    m.lm.num_sink_tokens = 0
    m.lm.sink_logits = "none"  # 'none' | 'learned' | 'zero'
    m.lm.rope_base = 10000.0
    c.batch_size = 32
    # 3 variants x 3 seeds in the 20-minute budget: 300 steps each. The levers known to
    # grow sinks did not grow one here (seed 0, vanilla, one run each): lr 2e-3 x 800 steps
    # gave mean attention to the first token 0.019 (uniform: 0.042); lr 5e-3, weight decay
    # 0.1 x 1600 steps 0.017, sink metric 0 both times. The higher lr is kept: far lower
    # perplexity (streaming 3.27 vs 5.09 per char).
    c.num_train_steps = 300
    c.optim.learning_rate = 5e-3
    c.optim.weight_decay = 0.1
    c.optim.warmup_steps = 30
    c.log_every = 100
    c.eval_every = 0
    c.checkpoint.every_steps = 0  # saved at the end: the streaming evaluation loads it
    c.mesh.data = 1  # tiny models: one device is fastest
    c.tensorboard = False

    c.stream = ml_collections.ConfigDict()
    c.stream.cache_size = 64  # C = x initial + (C - x) recent tokens, as StreamingLLM's x + y
    c.stream.initial_tokens = (0, 1, 2, 4)
    c.stream.num_streams = 8  # contiguous held-out (test split) texts, streamed in parallel
    c.stream.length = 2048  # tokens per stream (> the cache C and the training context T)

    c.sink_metric = ml_collections.ConfigDict()
    c.sink_metric.threshold = 0.3  # Gu et al. 2024: epsilon
    c.sink_metric.num_sequences = 64  # validation chunks of T tokens
    c.sink_metric.local = 8  # also report the attention on the 8 most recent keys

    if arg == "quick":
        m.d_model = 32
        m.num_heads = 2
        m.num_layers = 2
        m.mlp_dim = 128
        c.num_train_steps = 150
        c.optim.warmup_steps = 20
        c.log_every = 50
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
        c.stream.cache_size = 8
        c.stream.num_streams = 2
        c.stream.length = 40
        c.sink_metric.num_sequences = 4
    c.lock()
    return c


SEEDS = (0, 1, 2)


def sweep(arg: str | None = None) -> list[dict]:
    """StreamingLLM's three pre-training variants x seeds (one seed for 'quick' / 'test')."""
    seeds = SEEDS if arg in (None, "") else (0,)
    variants = {"vanilla": {}, "sink_token": {"model.lm.num_sink_tokens": 1},
                "zero_sink": {"model.lm.sink_logits": "zero"}}
    return [{"name": f"{name}/seed{s}", "seed": s, **over}
            for name, over in variants.items() for s in seeds]


REPORT = """
Training {v[train_min]:.1f} min (three variants x {v[num_seeds]} seeds), streaming evaluation and sink metric {v[eval_min]:.1f} min.

## Setup

* **Data**: Python standard library sources (`globalattn.data.charlm`, config `{c[data][config]}`), one id per byte (V = 128). Validation and test text come from held-out *files*.
* **Model** (`model.arch='lm'`, `globalattn.modules.lm.CausalLM`): {c[model][num_layers]} layers, d = {c[model][d_model]}, {c[model][num_heads]} heads, MLP {c[model][mlp_dim]}, RoPE (base {c[model][lm][rope_base]:g}), no dropout, {v[params]:,} parameters (vanilla).
* **Training** (`train_and_evaluate`, the standard checkpoint format): dense causal attention on chunks of T = {v[seq_len]} characters, batch {c[batch_size]}, {c[num_train_steps]} AdamW steps (peak lr {c[optim][learning_rate]:g}, {c[optim][warmup_steps]} warmup, cosine), {v[tokens_seen_m]:.1f}M characters seen per run, {v[num_seeds]} seeds per variant (each cell: mean ± 95% interval over seeds). The dense validation perplexity is over the whole validation split.
* **Variants** (as StreamingLLM's 160M models): *vanilla*; *1 learnable sink token* prepended to every training chunk and stream; *zero sink*: softmax-one, i.e. a per-head sink logit fixed at 0 in every layer (an extra softmax column with value 0).
* **Streaming**: {c[stream][num_streams]} contiguous held-out texts of {c[stream][length]} characters (longer than the cache and than T), decoded one token at a time through a KV cache of x initial tokens + the {c[stream][cache_size]} - x most recent (`globalattn.ops.streaming`), RoPE at positions inside the cache (StreamingLLM's convention). Perplexity per character over every prediction. For the sink-token model the learned token is the first of the x initial tokens, as in the paper.
* **Sink metric** (Gu et al. 2024): fraction of the {c[model][num_layers]} x {c[model][num_heads]} layer-heads whose attention to the first token, averaged over all queries of {c[sink_metric][num_sequences]} validation chunks (dense forward), exceeds {c[sink_metric][threshold]:g}; uniform attention would give {v[uniform_alpha]:.3f}. Next to it, where the attention goes: the mean attention on the {c[sink_metric][local]} most recent keys (the query's own included; uniform attention would give {v[uniform_local]:.3f}).

## Results: streaming perplexity (per character) with a cache of x + (C - x)

{tables[results]}

![streaming perplexity and attention to the first token](sinks.png)

## StreamingLLM (Xiao et al. 2023) beside it

160M-parameter models pre-trained from scratch (Table 3), cache x + (1024 - x):

| variant | 0+1024 | 1+1023 | 4+1020 |
|---|---:|---:|---:|
| vanilla | 27.87 | 18.49 | 18.05 |
| 1 learnable sink token | 1235 | 18.01 | 18.02 |
| zero sink (softmax-one) | 29214 | 19.90 | 18.01 |

Llama-2-7B (Table 2), cache x + (4096 - x): 0+4096: 3359.95, 1+4095: 11.88, 2+4094: 10.51, 4+4092: 9.59, 8+4088: 9.54.

## What the numbers say

* Evicting every initial token (0 + C instead of {c[stream][initial_tokens][3]} + (C - {c[stream][initial_tokens][3]})) changes perplexity by {v[evict][vanilla][mean]:+.2f}% ± {v[evict][vanilla][half_width]:.2f} (vanilla), {v[evict][sink_token][mean]:+.2f}% ± {v[evict][sink_token][half_width]:.2f} (sink token) and {v[evict][zero_sink][mean]:+.2f}% ± {v[evict][zero_sink][half_width]:.2f} (zero sink), 95% intervals over seeds; sink metrics {v[metric][vanilla]:.2f}, {v[metric][sink_token]:.2f}, {v[metric][zero_sink]:.2f}.
* **No sink emerged in the vanilla model, and the measurement says why.** Its mean attention to the first token is {v[mean_alpha][vanilla]:.3f} (largest layer-head {v[max_alpha][vanilla]:.3f}), below the {v[uniform_alpha]:.3f} of uniform attention: its heads avoid the first token rather than park on it. They attend locally instead: {v[local_mass][vanilla]:.2f} of every query's attention lies on the {c[sink_metric][local]} most recent characters (uniform: {v[uniform_local]:.3f}). A head whose useful keys are always a few characters back never needs a "no-op" target, so nothing is parked on the first token, and a cache of recent tokens holds what such a model reads: hence the small eviction effect in the first bullet. The levers known to grow sinks did not change this here (config comment: 1,600 steps at lr 5e-3 and weight decay 0.1 gave 0.017, 800 steps at 2e-3 gave 0.019, both with sink metric 0); Gu et al. 2024 see sinks emerge with far more training data than a 2-core CPU can process in this budget.
* Only the sink-token model loses when its initial tokens (its sink token first) are evicted, the StreamingLLM direction for that variant, but by {v[evict][sink_token][mean]:+.2f}% ± {v[evict][sink_token][half_width]:.2f}: within noise at {v[num_seeds]} seeds, far from the paper's collapse (1235 vs 18.01).
* The learnable sink token receives {v[mean_alpha][sink_token]:.3f} mean attention (largest layer-head {v[max_alpha][sink_token]:.3f}); the zero-sink model streams at {v[ppl][zero_sink][x0]:.4g} and {v[ppl][zero_sink][x4]:.4g} perplexity with 0 and 4 initial tokens.

## Honest differences from the paper

* **Scale**: {v[params]:,} parameters and {v[tokens_seen_m]:.1f}M training characters against 160M parameters (Pythia recipe on the Pile) and Llama-2-7B: attention sinks are known to grow with training (Gu et al. 2024), so a model this small and this briefly trained may have weak ones.
* **Units**: perplexity per *character* of Python source, not per BPE token of natural text; absolute values are not comparable with the paper's, only the ratios between caches of one model are.
* **Lengths**: training context T = {v[seq_len]} and cache C = {c[stream][cache_size]} (paper: 2048 and 1024 for the 160M models, 4096 for Llama-2); streams of {c[stream][length]} characters (paper: long concatenated texts, e.g. PG19).
* **Statistics**: {v[num_seeds]} seeds per variant, one set of held-out streams; the intervals are over seeds only.
* **Positions**: RoPE at positions inside the cache (as StreamingLLM does for Llama); once tokens are evicted the initial tokens sit right before the oldest window token. The streamed logits equal a dense forward whose attention keeps the first x tokens and a window of C - x (tests/test_streaming.py checks this to float tolerance).
"""
