"""Stream text from a trained causal LM through a fixed-memory KV cache.

    python -m experiments.reproduce sinks --quick      # trains three LMs in
                                                       # /tmp/globalattn_reproduce/sinks_quick/
    python -m experiments.generate --workdir=/tmp/globalattn_reproduce/sinks_quick/sink_token \\
        --prompt='def main(' --num_chars=600 --temperature=0.8

``--workdir`` is the workdir of any run of a ``model.arch='lm'`` config
(``configs/sinks.py``: one variant's directory of ``experiments.reproduce sinks``,
or ``experiments.train --config=configs/sinks.py``); the model and parameters
are loaded from its ``config.json`` and newest checkpoint, as a resumed run
would. The prompt is fed through the cache one character at a time, then
characters are sampled and printed as they come. The cache keeps
``--initial_tokens`` sink slots (the model's learned sink tokens count among
them) and a ring of ``--cache_size`` minus that many recent characters, so
memory stays fixed however long it runs (one jitted decode step, compiled once).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax

import globalattn  # noqa: F401  (the XLA workaround before any array exists)
from globalattn.data import charlm
from globalattn.modules import decode
from globalattn.modules.lm import CausalLM
from globalattn.train.trained import load_run


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m experiments.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a trained causal LM's workdir")
    parser.add_argument("--prompt", required=True, help="text to continue (non-empty)")
    parser.add_argument("--num_chars", type=int, default=400, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--initial_tokens", type=int, default=4,
                        help="sink slots kept forever (StreamingLLM's 4)")
    parser.add_argument("--cache_size", type=int, default=None,
                        help="total cache slots; default the run's stream.cache_size")
    args = parser.parse_args(argv)
    if not args.prompt:
        parser.error("--prompt must be non-empty")
    if args.num_chars < 0 or args.temperature < 0:
        parser.error(f"--num_chars={args.num_chars} and --temperature={args.temperature} "
                     "must be >= 0")
    try:
        config, model, params = load_run(args.workdir)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not isinstance(model, CausalLM):
        parser.error(f"{args.workdir} holds a {type(model).__name__}, not a causal LM "
                     "(model.arch='lm')")
    cache_size = args.cache_size or config.get("stream", {}).get("cache_size")
    if cache_size is None:
        parser.error("the run's config has no stream.cache_size: pass --cache_size")
    if not 0 <= args.initial_tokens < cache_size:
        parser.error(f"--initial_tokens={args.initial_tokens} must lie in [0, cache_size="
                     f"{cache_size})")
    prompt = charlm.encode(args.prompt)[None]
    step = decode.make_decode_step(model)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    out = []
    start = time.perf_counter()
    for token in decode.generate(
            model, params, prompt, args.num_chars, num_sink_slots=args.initial_tokens,
            window=cache_size - args.initial_tokens, rng=jax.random.key(args.seed),
            temperature=args.temperature, decode_step=step):
        text = charlm.decode(token)
        out.append(text)
        sys.stdout.write(text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{args.num_chars} chars after a {prompt.shape[1]}-char prompt; cache "
          f"{args.initial_tokens}+{cache_size - args.initial_tokens}; "
          f"{step.num_traces()} decode-step trace(s); {elapsed:.1f} s]", file=sys.stderr)
    return "".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
