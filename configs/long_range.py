"""Long-range retrieval: sliding window only vs CLS global vs extra learned globals.

The README main job. The CLS token (position 0) must report the value placed
right after a marker at position >= 32 of a T=64 sequence (8 classes). Two
layers of window radius 4 let position 0 see positions 0..8 only, so the
window-only model is provably at chance (1/8 = 12.5%); a global CLS, or
learned global tokens that everyone reads, reach the whole sequence.

Comparison (the three variants of ``sweep()``, a few minutes on 2 CPU cores)::

    python -m experiments.main --config=configs/long_range.py --workdir=/tmp/globalattn_main

One variant::

    python -m experiments.train --config=configs/long_range.py --workdir=/tmp/long_range_cls
    python -m experiments.train --config=configs/long_range.py --workdir=/tmp/long_range_none \\
        --config.model.strategy.name=none

Args: '' (400 steps), 'quick' (150 steps: a smoke run, CLS may not have
converged), 'test' (tiny data and model, 3 steps).
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "long_range_retrieval"
    c.data.config = "t64"
    c.model.head = "classify"
    c.model.pooling = "cls"
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.window = 4
    c.model.dropout = 0.0  # synthetic data, no overfitting at 400 steps; keeps the runs exact
    c.model.strategy.name = "cls"
    c.model.strategy.num_globals = 4  # used by 'extra'
    c.batch_size = 32
    c.num_train_steps = 400
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 40
    c.optim.weight_decay = 0.01
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint.every_steps = 200
    if arg == "quick":
        c.num_train_steps = 150
        c.optim.warmup_steps = 15
        c.eval_every = 0
    elif arg == "test":
        shrink_for_tests(c)
        c.model.window = 2
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """The README comparison: what does the CLS readout see?"""
    del arg
    return [
        {"name": "window_only", "model.strategy.name": "none"},
        {"name": "cls_global", "model.strategy.name": "cls"},
        {"name": "extra_globals_4", "model.strategy.name": "extra",
         "model.strategy.num_globals": 4},
    ]
