"""Synthetic extractive QA: find the value span of the queried key among 32 records.

The question (segment 0: ``CLS key SEP``) comes first; the answer is anywhere
in a context of up to 196 tokens. ``strategy='task'`` makes the question
tokens global (Longformer QA), so every context token can compare itself with
the question in one layer.

    python -m experiments.train --config=configs/span_qa.py --workdir=/tmp/span_qa
    python -m experiments.train --config=configs/span_qa.py --workdir=/tmp/span_qa_none \\
        --config.model.strategy.name=none

Args: '' (1500 steps), 'quick' (200 steps), 'test' (tiny data, 3 steps).
``sweep()``: window only, CLS global, question tokens global.
"""
import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "test"))
    c = base_config()
    c.data.name = "span_qa"
    c.data.config = "r32"
    c.model.head = "span"
    c.model.num_layers = 3
    c.model.d_model = 64
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.window = 8
    c.model.dropout = 0.0
    c.model.strategy.name = "task"
    c.model.strategy.num_globals = 4  # the question: CLS, 2 key tokens, SEP
    c.model.strategy.question_segment = 0
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
        c.model.strategy.num_globals = 3  # tiny: 1-token keys
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    del arg
    return [
        {"name": "window_only", "model.strategy.name": "none"},
        {"name": "cls_global", "model.strategy.name": "cls"},
        {"name": "question_global", "model.strategy.name": "task"},
    ]
