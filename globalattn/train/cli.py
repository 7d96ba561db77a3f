"""Command-line plumbing shared by experiments/*.py: absl flag parsing with clear errors."""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

__all__ = ["parse_flags"]


def parse_flags(argv: Sequence[str], required: Sequence[str] = (), usage: str = "") -> None:
    """Parses absl flags (``--config=...``, ``--config.a.b=v``) or exits with status 2.

    A misspelt ``--config.field`` (ml_collections raises AttributeError / KeyError
    with a "did you mean"), a value of the wrong type and a missing required flag
    each print one ``error:`` paragraph instead of a traceback.
    """
    try:
        flags.FLAGS(list(argv))
        if "config" in flags.FLAGS and flags.FLAGS["config"].present:
            flags.FLAGS["config"].value  # noqa: B018 -- loads the file: get_config errors surface here
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        sys.exit(2)
    missing = [name for name in required if flags.FLAGS[name].value is None]
    if missing:
        print(f"error: missing --{' --'.join(missing)}\n{usage}", file=sys.stderr)
        sys.exit(2)


def _message(err: BaseException) -> str:
    text = str(err).strip()
    # ml_collections wraps a KeyError's repr in an AttributeError: unwrap the quoting.
    while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    text = text.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')
    if "Traceback (most recent call last)" in text:  # config_flags embeds get_config's traceback
        lines = [x for x in text.splitlines() if x.strip()]
        text = f"{lines[0]} {lines[-1]}"
    if isinstance(err, (AttributeError, KeyError)) and "did you mean" in text.lower():
        text = f"unknown config field {text}"
    return text
