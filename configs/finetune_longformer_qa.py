"""Fine-tune pretrained Longformer for extractive QA with the question tokens global.

Mirrors Longformer's TriviaQA setup (Beltagy et al., 2020): 4,096-token inputs,
every question token global (``strategy='task'``, segment 0 = question), start /
end logits per token, AdamW at 3e-5 with warmup, batch 32. Convert the
released checkpoint once, then fine-tune (every host of a pod runs the same
command; see the README section "Fine-tune a pretrained Longformer")::

    python -m globalattn.convert hf --model-dir /ckpt/hf/longformer-base-4096 --out /ckpt/lf_base
    python -m experiments.train --config=configs/finetune_longformer_qa.py:jsonl \\
        --config.init_from=/ckpt/lf_base --workdir=/tmp/lf_qa \\
        --config.data.config=/data/triviaqa_lf --config.data.data_dir=/data/tfds

``/data/triviaqa_lf`` is a directory of TriviaQA tokenised with the
checkpoint's tokenizer (RoBERTa BPE ids, ``<s>`` and separators included):
``metadata.json`` (``{"kind": "span", "vocab_size": 50265, "max_length": 4096,
"max_question_length": 64}``), ``train.jsonl`` and ``validation.jsonl`` with one
``{"tokens": [...], "segment_ids": [...], "start": s, "end": e}`` per line:
``segment_ids`` 0 on the question (the global tokens; at most
``model.strategy.num_globals``, 64, of them), 1 on the context, ``start`` /
``end`` the inclusive answer token positions (format and checks:
:mod:`globalattn.data.jsonl`). The first run validates every line and converts
the files once into ``data.data_dir`` (a pod: run ``python -m globalattn.data
prepare jsonl /data/triviaqa_lf --data_dir /data/tfds`` once first). Any other
registered span task with the same conventions works through
``--config.data.name=NAME --config.data.config=CFG``; without overrides the data
is the synthetic span QA task (a runnable stand-in, not TriviaQA).

Args: '' (the paper-scale run), 'quick' (200 steps), 'jsonl' (the paper-scale run on
the JSONL directory given by ``--config.data.config``, final evaluation on its
validation split), 'test' (CPU-sized: ``init_from`` is the tiny random checkpoint
``tests/fixtures/hf_golden/longformer_qa``, loaded in memory, with the tiny span QA
data; 3 steps)::

    python -m experiments.train --config=configs/finetune_longformer_qa.py:test \\
        --workdir=/tmp/finetune_longformer_qa_test
"""
import os

import ml_collections

from globalattn.train.config import base_config, check_arg, shrink_for_tests, use_jsonl_data

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = check_arg(arg, ("quick", "jsonl", "test"))
    c = base_config()
    c.data.name = "span_qa"
    c.data.config = "r32"
    c.model.head = "span"
    c.model.dropout = 0.1  # hidden_dropout_prob of the released checkpoints
    c.model.strategy.name = "task"  # the question tokens are global
    c.model.strategy.question_segment = 0
    c.model.strategy.num_globals = 64  # capacity: the longest question, in tokens
    c.batch_size = 32
    c.num_train_steps = 10000
    c.optim.learning_rate = 3e-5
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 0.01
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
        c.init_from = os.path.join(_REPO, "tests", "fixtures", "hf_golden", "longformer_qa")
        c.model.strategy.num_globals = 3  # tiny span QA: CLS, 1-token key, SEP
        c.model.dropout = 0.0
        c.optim.learning_rate = 1e-3
    c.lock()
    return c


def sweep(arg: str | None = None) -> list[dict]:
    """The Longformer ablation: question tokens global vs only <s> global."""
    del arg
    return [
        {"name": "question_global"},
        {"name": "cls_global", "model.strategy.name": "cls"},
    ]
