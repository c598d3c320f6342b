"""What the command lines share: a parser of subcommands with examples, a user error as one line, no
silent overwrite, an optional progress bar.

Plumbing for countdown.py's and traces.py's CLIs. Pure standard library (tqdm when installed);
nothing here imports a core file.
"""

from __future__ import annotations

import argparse
import os
import sys

# A user's mistake (a bad value, a missing input, an output that exists): one line and exit code 2.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def command_parser(description, examples):
    """(parser, subparsers): a CLI whose first word picks a required subcommand, its --help ending in
    the example command lines as written."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="examples:\n" + "\n".join("  " + e for e in examples),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser, parser.add_subparsers(dest="command", required=True)


def run_command(command, args) -> int:
    """command(args) -> its exit code (None counts as 0); a user error prints `error: ...` and gives 2."""
    try:
        return command(args) or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def refuse_overwrite(path, force):
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it or choose another --out")


def progress_bar(total, desc):
    """A tqdm bar if tqdm is installed (optional: countdown.py needs only the standard library)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, disable=total < 2000)
