"""Train one config: ``python -m experiments.train --config=configs/<file>.py[:arg] --workdir=DIR``.

Any field can be overridden: ``--config.model.window=8 --config.optim.learning_rate=1e-3``.
A misspelt field or a value of the wrong type is an error before anything
runs; so is an inconsistent config (see globalattn.train.config.validate_config).
Rerunning with the same workdir resumes from its newest checkpoint; SIGTERM
(or Ctrl-C) saves a checkpoint and exits with status 0.
"""
from __future__ import annotations

import sys

from absl import flags

from globalattn.train import distributed
from globalattn.train.cli import config_flag_values, parse_flags
from globalattn.train.loop import train_and_evaluate


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv if argv is None else argv)
    fv, config_flag = config_flag_values(
        argv, None, "Experiment config file, e.g. configs/long_range.py[:quick].")
    workdir = flags.DEFINE_string("workdir", None, "Output directory (resumed if it exists).",
                                  flag_values=fv)
    parse_flags(argv, required=("config", "workdir"), usage=__doc__, flag_values=fv)
    config = config_flag.value
    # Multi-host: connect the processes before any JAX computation (a no-op on one machine).
    settings = config.get("distributed")
    distributed.initialize(None if settings is None else settings.to_dict())
    try:
        result = train_and_evaluate(config, workdir.value)
    except ValueError as err:
        if str(err).startswith("invalid config"):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    print({k: v for k, v in result.items() if not k.startswith("train/")})
    return result


if __name__ == "__main__":
    main()
