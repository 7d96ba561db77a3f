"""E3: an equal budget of G = 8 special positions, placed by each strategy (mirrors BigBird Table 1).

Long-range retrieval with distractors (T = 64, 8 classes), 2 layers, window
radius 4: window only, the first 8 tokens, every T/8-th token, 8 learned extra
tokens (ETC), BigBird ITC (block window + 8 globals + random blocks), BigBird
random + window without globals, Perceiver IO with 8 latents, full attention.

    python -m experiments.reproduce strategies --out=results   # -> results/strategies.md
    python -m experiments.reproduce strategies --quick
    python -m experiments.main --config=configs/strategies.py --workdir=/tmp/strategies

Args: '' (the table), 'quick' (tiny data and model, 4 steps, 4 rows), 'test' (tests).
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests

MEASURE = "train_sweep"
TITLE = "Equal budget of special positions (E3, mirrors BigBird Table 1)"
BIGBIRD_TABLE1 = {"BERT": (64.2, 88.5, 83.4), "Random": (60.1, 83.0, 80.2),  # MLM/SQuAD/MNLI
                  "Window": (58.3, 76.4, 73.1), "Random+Window": (62.7, 85.1, 80.5)}
FULL = {"model.strategy.name": "none", "model.attention_schedule": "full"}
ROWS = {  # row -> (overrides, what it is, the published row it mirrors)
    "window_only": ({"model.strategy.name": "none"}, "sliding window only", "Window"),
    "first_8": ({"model.strategy.name": "first"}, "first 8 tokens global", None),
    "periodic_8": ({"model.strategy.name": "periodic"}, "every T/8-th token global (8)", None),
    "extra_8": ({"model.strategy.name": "extra"}, "8 learned global tokens (ETC)", None),
    "bigbird_8": ({"model.strategy.name": "bigbird"},
                  "BigBird ITC: block window + 8 global + random blocks", None),
    "bigbird_random_window": ({"model.strategy.name": "bigbird", "num_active_globals": 0},
                              "BigBird block window + random blocks, no globals",
                              "Random+Window"),
    "perceiver_8": ({"model.arch": "perceiver"}, "Perceiver IO, 8 latents", None),
    "full_attention": (FULL, "full attention", "BERT"),
}
QUICK_ROWS = ("window_only", "first_8", "extra_8", "bigbird_8")  # the distinct code paths
LABELS = {name: (what, "-" if ref is None else
                 f"BigBird {ref}: " + "/".join(map(str, BIGBIRD_TABLE1[ref])))
          for name, (_, what, ref) in ROWS.items()}
FIGURE = {"kind": "scatter", "logx": True, "xlabel": "attention density (pairs / full attention)",
          "hlines": [{"label": "chance", "y": "task.chance", "style": ":", "color": "gray"}]}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "long_range_retrieval"
    c.data.config = "t64_distract"
    c.model.head = "classify"
    c.model.pooling = "cls"
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.window = 4
    c.model.dropout = 0.0
    c.model.strategy.num_globals = 8  # G, the budget of every row
    c.model.strategy.block_size = 4  # BigBird: the first and last block (2 x 4) are global
    c.model.perceiver.num_latents = 8
    c.batch_size = 32
    c.eval_batch_size = 200
    c.num_train_steps = 600
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 60
    c.optim.weight_decay = 0.01
    c.log_every = 50
    c.eval_every = 0
    c.checkpoint.every_steps = 0
    c.tensorboard = False
    if arg == "quick":  # smoke run: tiny data and model, 4 steps, one device, one layer
        c.data.config = "tiny"
        c.model.window = 2
        c.model.d_model = 16
        c.model.num_heads = 2
        c.model.mlp_dim = 32
        c.model.num_layers = 1
        c.model.perceiver.num_latent_layers = 1
        c.batch_size = 8
        c.eval_batch_size = 50
        c.num_train_steps = 4
        c.optim.warmup_steps = 1
        c.log_every = 2
        c.mesh.data = 1
    elif arg == "test":
        shrink_for_tests(c)
        c.model.window = 2
        c.eval_batch_size = None
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    arg = check_arg(arg, ("quick", "test"))
    names = QUICK_ROWS if arg == "quick" else tuple(ROWS)
    return [{"name": name, **ROWS[name][0]} for name in names]


REPORT = """
## Setup

* **Data** `long_range_retrieval/{v[task][name]}`: as E1 (T = {v[task][seq_len]}, marker and value at >= {v[task][min_distance]}, chance {v[task][chance]:.1f}%) plus {v[task][num_distractors]} distractor values beyond min_distance; only the value after the marker counts.
* **Budget**: G = {c[model][strategy][num_globals]} special positions, {c[model][num_layers]} layers, window radius {c[model][window]}. BigBird: blocks of {c[model][strategy][block_size]}, first and last block global, a {c[model][strategy][window_blocks]}-block window instead of the token window, {c[model][strategy][num_random_blocks]} random blocks per query block, head and layer (resampled every training step, one fixed draw at evaluation); random + window is the same with no global (`num_active_globals=0`), BigBird's R+W row. Perceiver IO: {c[model][perceiver][num_latents]} latents cross-attend the inputs once, {c[model][perceiver][num_latent_layers]} latent self-attention layers, one output query.
* **Density** = pairs of one forward / (L T^2), L = {c[model][num_layers]}, the full-attention model's; BigBird counted on its evaluation mask (mean over heads), Perceiver as T M + M^2 per latent layer + M.
* **Training**: batch {c[batch_size]}, {c[num_train_steps]} AdamW steps (peak lr {c[optim][learning_rate]:g} after {c[optim][warmup_steps]} linear warmup steps, cosine decay to 0, weight decay {c[optim][weight_decay]:g} on matrices, gradient clipping {c[optim][grad_clip_norm]:g}), one seed; every row the same recipe. Model: pre-LN blocks, d = {c[model][d_model]}, {c[model][num_heads]} heads, MLP {c[model][mlp_dim]}, no dropout, CLS readout.
* **Hops.** With CLS itself global (first, periodic, BigBird ITC) two attention steps suffice: layer 1 lets the value token see the marker, layer 2 lets CLS read it. Learned extra tokens and Perceiver latents attend the raw inputs with queries that do not depend on the input, before any value token knows it follows the marker: CLS gets a token-by-token summary from which its last layer and MLP must decode the marked value, with no attention step doing the match (not impossible, but a third hop would make it direct).

## Results

{tables[results]}

![density vs accuracy](strategies.png)

## What the numbers say

* Test accuracy: window only {v[test][window_only]:.1f}%, first 8 {v[test][first_8]:.1f}%, periodic 8 {v[test][periodic_8]:.1f}%, extra 8 {v[test][extra_8]:.1f}%, BigBird ITC {v[test][bigbird_8]:.1f}%, BigBird random + window {v[test][bigbird_random_window]:.1f}%, Perceiver {v[test][perceiver_8]:.1f}%, full attention {v[test][full_attention]:.1f}%.
* BigBird Table 1 (MLM): Window 58.3 < Random+Window 62.7 < BERT 64.2. In the full run the first inequality holds here (window {v[test][window_only]:.1f}% < random + window {v[test][bigbird_random_window]:.1f}%) and the second does not (full attention {v[test][full_attention]:.1f}%). Our window is provably blind to the answer, hence its far larger gap.
* In the full run the best sparse patterns make CLS global (periodic, first, BigBird ITC), as the hop count above predicts; learned extra tokens and Perceiver latents, which need a third hop, trail them.
* Full attention can express the same two hops, so its low score in the full run is a failure to learn in {c[num_train_steps]} steps with this recipe, not a lack of reach: each value token must find the marker right before it through learned absolute positions among all tokens, where the window narrows the search to its neighbours. BigBird's BERT row is a converged pretrained model.

## Honest differences from the paper

* BigBird's Table 1 is BERT-base pretraining at length 512 (MLM, then SQuAD, MNLI); ours is one synthetic task at T = {v[task][seq_len]}, from scratch, one seed: only orderings compare.
* Equal budget is equal G, not equal compute: see the density column (BigBird's random blocks, the extra tokens' longer sequence); Perceiver's pairs are not per layer.
* The BigBird rows' accuracies belong to the one evaluation draw of random blocks.
* Every row stopped at the same step budget: this ranks patterns at equal training, not at convergence.
"""
