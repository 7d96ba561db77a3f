"""Fine-tune pretrained BigBird-ITC for document classification.

Mirrors BigBird's classification setup (Zaheer et al., 2020): 4,096-token
inputs, block-sparse attention with the checkpoint's block size (64) and
random blocks (3; a fresh draw every step while training, a fixed draw for
evaluation), a classification head on the first token, AdamW at 1e-5 with
warmup, batch 32::

    python -m globalattn.convert hf --model-dir /ckpt/hf/bigbird-roberta-base --out /ckpt/bb_base
    python -m experiments.train --config=configs/finetune_bigbird_classify.py:jsonl \\
        --config.init_from=/ckpt/bb_base --workdir=/tmp/bb_cls \\
        --config.data.config=/data/imdb_rb --config.data.data_dir=/data/tfds

``/data/imdb_rb`` is a directory of IMDB (or Hyperpartisan, ...) tokenised with
the checkpoint's tokenizer (the ids the model takes, its special tokens included):
``metadata.json`` (``{"kind": "classification", "vocab_size": 50358,
"max_length": 4096, "num_classes": 2}``), ``train.jsonl`` and
``validation.jsonl`` (``test.jsonl`` optional) with one ``{"tokens": [...],
"label": k}`` per line (format and checks: :mod:`globalattn.data.jsonl`). The
first run validates every line and converts the files once into
``data.data_dir`` (a pod: run ``python -m globalattn.data prepare jsonl
/data/imdb_rb --data_dir /data/tfds`` once first). Any other registered
classification task tokenised with the checkpoint's vocabulary works through
``--config.data.name=NAME --config.data.config=CFG``; without overrides the data
is the synthetic long-range retrieval task (a runnable stand-in, not IMDB).

Args: '' (the paper-scale run), 'quick' (200 steps), 'jsonl' (the paper-scale run on
the JSONL directory given by ``--config.data.config``, final evaluation on its
validation split), 'test' (CPU-sized: ``init_from`` is the tiny random checkpoint
``tests/fixtures/hf_golden/bigbird_cls`` -- block size 4, one random block -- loaded
in memory, with the tiny retrieval data, T=32, long enough for the block-sparse
path; 3 steps)::

    python -m experiments.train --config=configs/finetune_bigbird_classify.py:test \\
        --workdir=/tmp/finetune_bigbird_classify_test
"""
import os

import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests, use_jsonl_data

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "jsonl", "test"))
    c = base_config()
    c.data.name = "long_range_retrieval"
    c.data.config = "t64"
    c.model.head = "classify"
    c.model.dropout = 0.1
    c.model.strategy.name = "bigbird"  # the checkpoint's first / last blocks are global
    c.model.strategy.train_random = "resample"
    c.model.strategy.eval_random = "fixed"
    c.model.strategy.eval_seed = 0
    c.batch_size = 32
    c.num_train_steps = 5000
    c.optim.learning_rate = 1e-5
    c.optim.warmup_steps = 500
    c.optim.b2 = 0.999
    c.log_every = 50
    c.checkpoint.every_steps = 1000
    c.mesh.data = -1
    if arg == "quick":  # a smoke run of the full configuration
        c.num_train_steps = 200
        c.optim.warmup_steps = 20
    elif arg == "jsonl":  # local pre-tokenised files: --config.data.config=DIR (required)
        use_jsonl_data(c)
    elif arg == "test":  # CPU-sized: a tiny converted model, tiny data, 3 steps
        shrink_for_tests(c)
        # The tiny random Hugging Face checkpoint the parity tests use (loaded in memory).
        c.init_from = os.path.join(_REPO, "tests", "fixtures", "hf_golden", "bigbird_cls")
        c.model.dropout = 0.0
        c.optim.learning_rate = 1e-3
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """Evaluation with the training-time policy (a fresh draw each call) vs a fixed draw."""
    del arg
    return [{"name": "eval_fixed"},
            {"name": "eval_resample", "model.strategy.eval_random": "resample"}]
