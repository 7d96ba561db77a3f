"""MQAR (Zoology): recall the value of each queried key; V=256, T=128, K=8 pairs.

Labels sit at the query positions (token head). The key-value block occupies
the first 2K = 16 positions, so ``strategy='first'`` with 16 globals makes the
whole block readable from every query, while a window of radius 8 reaches
only queries close to it.

    python -m experiments.train --config=configs/mqar.py --workdir=/tmp/mqar
    python -m experiments.train --config=configs/mqar.py --workdir=/tmp/mqar_k16 \\
        --config.data.config=v256_t128_k16 --config.model.strategy.num_globals=32

Args: '' (1500 steps), 'quick' (200 steps), 'test' (tiny data, 3 steps).
``sweep()``: window only, first-16 globals, 4 extra globals, periodic globals.
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "mqar"
    c.data.config = "v256_t128_k8"
    c.model.head = "token"
    c.model.num_layers = 2
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.window = 8
    c.model.dropout = 0.0
    c.model.strategy.name = "first"
    c.model.strategy.num_globals = 16  # the 2K = 16 key-value positions
    c.batch_size = 32
    c.num_train_steps = 1500
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 150
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    if arg == "quick":
        c.num_train_steps = 200
        c.optim.warmup_steps = 20
        c.eval_every = 0
    elif arg == "test":
        shrink_for_tests(c)
        c.model.strategy.num_globals = 8  # tiny: K = 4 pairs
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    del arg
    return [
        {"name": "window_only", "model.strategy.name": "none"},
        {"name": "first_globals", "model.strategy.name": "first"},
        {"name": "extra_globals_4", "model.strategy.name": "extra",
         "model.strategy.num_globals": 4},
        {"name": "periodic_globals", "model.strategy.name": "periodic"},
    ]
