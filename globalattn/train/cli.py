"""Command-line plumbing shared by experiments/*.py: absl flag parsing with clear errors."""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import config_flags

__all__ = ["config_flag_values", "parse_flags"]


def config_flag_values(argv: Sequence[str], default: str | None, help_text: str):
    """A fresh ``FlagValues`` holding ``--config`` for one call of a command's ``main``.

    ml_collections finds the ``--config.x=y`` overrides in the argv it is given
    at definition, so a flag defined at import (on absl's global ``FLAGS``)
    sees only ``sys.argv``: ``main([... '--config.x=y'])`` called in-process
    would reject the override, and a second call would define the flag twice.
    Returns ``(flag_values, config_flag)``; define the command's other flags on
    ``flag_values`` and pass it to :func:`parse_flags`.
    """
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", default, help_text, flag_values=fv,
                                             lock_config=True, sys_argv=list(argv))
    return fv, config


def parse_flags(argv: Sequence[str], required: Sequence[str] = (), usage: str = "",
                flag_values: flags.FlagValues | None = None) -> None:
    """Parses absl flags (``--config=...``, ``--config.a.b=v``) or exits with status 2.

    A misspelt ``--config.field`` (ml_collections raises AttributeError / KeyError
    with a "did you mean"), a value of the wrong type and a missing required flag
    each print one ``error:`` paragraph instead of a traceback; so do a config file
    that cannot be loaded and a ``--workdir`` that exists but is not a directory.
    ``--help`` / ``-h`` prints ``usage`` and the flags, then exits with status 0.
    ``flag_values``: the flags to parse into (default absl's global ``FLAGS``).
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    if any(a in ("--help", "-h", "--helpfull", "-?") for a in list(argv)[1:]):
        listing = fv.main_module_help() if fv is flags.FLAGS else fv.get_help()
        print(usage.strip() + "\n\nflags:\n" + listing if usage else fv.get_help())
        sys.exit(0)
    try:
        fv(list(argv))
        if "config" in fv and fv["config"].present:
            path = config_flags.get_config_filename(fv["config"]).partition(":")[0]
            if not os.path.isfile(path):
                raise OSError(f"config file {path!r} does not exist")
            # Loads the file (lazily wrapped by ml_collections): get_config errors surface here.
            fv["config"].value.keys()
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        sys.exit(2)
    missing = [name for name in required if fv[name].value is None]
    if missing:
        print(f"error: missing --{' --'.join(missing)}\n{usage}", file=sys.stderr)
        sys.exit(2)
    workdir = fv["workdir"].value if "workdir" in fv else None
    if workdir and os.path.exists(workdir) and not os.path.isdir(workdir):
        print(f"error: --workdir={workdir} is a file, not a directory", file=sys.stderr)
        sys.exit(2)


def _message(err: BaseException) -> str:
    text = str(err).strip()
    # ml_collections wraps a KeyError's repr in an AttributeError: unwrap the quoting.
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = text.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')
    if isinstance(err, OSError) and "Failed loading config file" in text:
        # ml_collections: "Failed loading config file NAME" + the import's traceback.
        name = text.splitlines()[0].replace("Failed loading config file", "").strip()
        return f"cannot load config file {name} (no such file, or it fails to import)"
    if "Traceback (most recent call last)" in text:  # config_flags embeds get_config's traceback
        lines = [x for x in text.splitlines() if x.strip()]
        text = f"{lines[0]} {lines[-1]}"
    if isinstance(err, (AttributeError, KeyError)) and "did you mean" in text.lower():
        text = f"unknown config field {text}"
    elif isinstance(err, KeyError):  # an override naming a field with no near match
        text = f"unknown config field {text!r}"
    return text
