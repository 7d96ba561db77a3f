"""Prepare data sets from the shell, once, before training.

    python -m globalattn.data prepare listops short --data_dir /tmp/tfds
    python -m globalattn.data prepare mqar '{"base": "tiny", "num_train": 5000}'
    python -m globalattn.data prepare jsonl /data/imdb_tok --data_dir /tmp/tfds  # validate + convert
    python -m globalattn.data prepare-tfds imdb_reviews --data_dir /tmp/tfds  # needs network
    python -m globalattn.data list
"""
from __future__ import annotations

import argparse
import json
import time

from globalattn.data import pipeline, standard_tfds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m globalattn.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "prepare-tfds", "list"])
    parser.add_argument("name", nargs="?", help="task / catalogue data set name")
    parser.add_argument("config", nargs="?",
                        help="config name, JSON dict of overrides, or (jsonl) the directory")
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, cls in pipeline.BUILDERS.items():
            print(name, [c.name for c in cls.BUILDER_CONFIGS] or "(config: a directory)")
        return
    if not args.name:
        parser.error(f"{args.command} needs a name")
    start = time.perf_counter()
    if args.command == "prepare-tfds":
        standard_tfds.standard_source(args.name, "train", args.data_dir)
        print(f"prepared {args.name} in {time.perf_counter() - start:.1f} s")
        return
    config = args.config
    if config and config.lstrip().startswith("{"):
        config = json.loads(config)
    builder = pipeline.prepare(args.name, config, args.data_dir)
    print(f"prepared {builder.data_dir} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
