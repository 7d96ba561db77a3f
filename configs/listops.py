"""ListOps (LRA, ``]`` kept): hierarchical reasoning over 100-256 tokens, CLS readout.

ListOps has no CLS in its data, so ``data.prepend_cls`` puts one at position 0
(T = 257). The LRA recipe (6 layers, d 512, 5k steps at length 2000) is a pod
job: ``--config.data.config=lra --config.model.num_layers=6
--config.model.d_model=512 --config.model.num_heads=8 --config.model.mlp_dim=2048
--config.num_train_steps=5000``. The default here fits a CPU in about half an hour.

    python -m experiments.train --config=configs/listops.py --workdir=/tmp/listops
    python -m experiments.train --config=configs/listops.py:quick --workdir=/tmp/listops_quick

Args: '' (2000 steps on 'short'), 'quick' (200 steps), 'test' (tiny data, 3 steps).
``sweep()``: window only, CLS global, 4 extra globals, BigBird.
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "listops"
    c.data.config = "short"
    c.data.prepend_cls = True
    c.model.head = "classify"
    c.model.pooling = "cls"
    c.model.num_layers = 4
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.window = 8
    c.model.dropout = 0.1
    c.model.strategy.name = "cls"
    c.model.strategy.block_size = 16  # used by 'bigbird'
    c.batch_size = 32
    c.num_train_steps = 2000
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.1
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint.every_steps = 500
    if arg == "quick":
        c.num_train_steps = 200
        c.optim.warmup_steps = 20
        c.eval_every = 0
    elif arg == "test":
        shrink_for_tests(c)
        c.model.strategy.block_size = 8
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    del arg
    return [
        {"name": "window_only", "model.strategy.name": "none"},
        {"name": "cls_global", "model.strategy.name": "cls"},
        {"name": "extra_globals_4", "model.strategy.name": "extra",
         "model.strategy.num_globals": 4},
        {"name": "bigbird", "model.strategy.name": "bigbird"},
    ]
