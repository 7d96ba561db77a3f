"""E2: MQAR accuracy vs number of global tokens, for several numbers of key-value pairs.

Window-local attention (radius 4) plus the first n positions made global, for
n in ``ablation()['num_active_globals']``: the K key-value pairs occupy the
first 2K positions, so n >= 2K makes every pair readable from every query. All
global counts (and seeds) of one task size train in ONE vmapped program
(experiments/ablate.py; the model has capacity G = 16 and masks the inactive slots).

    python -m experiments.ablate --config=configs/global_count.py --workdir=/tmp/global_count
    python -m experiments.reproduce global_count          # the same, -> results/global_count.md

Args: '' (the full ablation), 'quick' (a smoke run), 'test' (tiny data and model).
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "mqar"
    c.data.config = "v64_t64_k4"
    c.model.head = "token"
    c.model.num_layers = 2
    c.model.d_model = 64
    # One head of dimension 64: with 4 heads of 16 the models sat on the 1/K plateau
    # ("one of the K values") for 1000+ steps (measured 25% at K=4, lr 2e-3..8e-3);
    # with one head of 64 they start binding keys to values within ~750 steps at lr 3e-3.
    c.model.num_heads = 1
    c.model.mlp_dim = 128
    c.model.window = 4
    c.model.dropout = 0.0
    c.model.strategy.name = "first"
    c.model.strategy.num_globals = 16  # capacity; variants activate the first n
    c.batch_size = 32
    c.num_train_steps = 1000
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.log_every = 100
    c.checkpoint.every_steps = 0
    c.mesh.data = 1  # the ablation program runs on one device
    if arg == "quick":
        c.num_train_steps = 30
        c.optim.warmup_steps = 5
        c.log_every = 10
    elif arg == "test":
        shrink_for_tests(c)
        c.model.strategy.num_globals = 8
    c.lock()
    return c


def ablation(arg: str | None = None) -> dict:
    """The axes experiments/ablate.py sweeps (one compiled program per task size)."""
    arg = check_arg(arg, ("quick", "test"))
    if arg == "test":
        return {"num_active_globals": [0, 8], "seeds": [0], "learning_rates": [3e-3],
                "data_configs": ["tiny"], "speedup_steps": 0}
    if arg == "quick":
        return {"num_active_globals": [0, 4, 16], "seeds": [0], "learning_rates": [3e-3],
                "data_configs": ["v64_t64_k2", "v64_t64_k4"], "speedup_steps": 3}
    # n = 4, 8, 16 is exactly 2K for K = 2, 4, 8: each line has points below and at 2K.
    return {"num_active_globals": [0, 4, 8, 16], "seeds": [0], "learning_rates": [3e-3],
            "data_configs": ["v64_t64_k2", "v64_t64_k4", "v64_t64_k8"], "speedup_steps": 10}
