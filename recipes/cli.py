"""The ``maskmtl`` command (``[project.scripts]`` in ``pyproject.toml``): the tools of ``tools/``
under one program.

    maskmtl run [HYDRA ARGS ...]         # = python tools/run.py ...     (recipes.tools.run)
    maskmtl report SWEEP [OPTIONS ...]   # = python tools/report.py ...
    maskmtl export RUN_DIR task=NAME ... # = python tools/export.py ...  (recipes.tools.export)
    maskmtl bench NAME [key=value ...]   # = python tools/bench.py ...   (recipes.tools.bench; from a checkout)

Everything after the command goes to the tool unchanged (Hydra's overrides, ``-m``, ``--cfg job``,
``--help``, ...) and the tool's exit status is the command's. An unknown command is one error line
and status 2.

Shell completion is Hydra's, for ``maskmtl run``: ``eval "$(maskmtl run -sc install=bash)"``
registers it for the program ``maskmtl`` in the running bash. Hydra's script then asks
``maskmtl -sc query=bash`` with the line being typed in ``COMP_LINE``; :func:`main` completes the
command names itself, hands a ``maskmtl run ...`` line to Hydra without the word ``run``, and
offers nothing after the other commands (bash then completes file names).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Sequence

from recipes.tools import exit_status

SHELL_COMPLETION = ("-sc", "--shell-completion")


def run(argv: list[str]) -> int:
    from recipes.tools.run import main

    line = os.environ.get("COMP_LINE")
    if line is None or not any(a in SHELL_COMPLETION for a in argv):
        return main(argv)
    # Hydra completes the overrides after the program's name; here that is "maskmtl run".
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+\s+)run(?=\s|$)\s*", r"\1", line, count=1)
    try:
        return main(argv)
    finally:
        os.environ["COMP_LINE"] = line


def report(argv: list[str]) -> int:
    from recipes.tools.report import main

    return main(argv)


def export(argv: list[str]) -> int:
    from recipes.tools.export import main

    return main(argv, prog="maskmtl export")


def bench(argv: list[str]) -> int:
    from recipes.tools.bench import main

    return main(argv, prog="maskmtl bench")


COMMANDS = {
    "run": (run, "run a recipe: Hydra's command line (group=option key=value, -m, --cfg job, --help)"),
    "report": (report, "a sweep's runs as a table and curves"),
    "export": (export, "a finished run's structured mask as a smaller dense model"),
    "bench": (bench, "run a benchmark (from a checkout)"),
}
USAGE = f"usage: maskmtl {{{','.join(COMMANDS)}}} [ARGS ...]"


def help_text() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (f"{USAGE}\n\nConfig-first sparse multi-task training with per-task binary masks.\n\n"
            f"commands (each = python tools/COMMAND.py in a checkout):\n{rows}\n\n"
            f"`maskmtl COMMAND --help` describes one command. Shell completion for bash:\n"
            f'  eval "$(maskmtl run -sc install=bash)"')


def complete(argv: list[str]) -> int:
    """``maskmtl -sc ...``: Hydra's completion script asks ``maskmtl -sc query=bash`` (``fish``,
    ``zsh``) with ``COMP_LINE`` set; ``install=`` / ``uninstall=`` are ``maskmtl run``'s."""
    line = os.environ.get("COMP_LINE")
    if line is None or not any(a.startswith("query=") for a in argv[1:]):
        return run(argv)
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line[-1:].isspace()):  # the command itself
        typed = words[1] if len(words) == 2 else ""
        sep = "\n" if any(a == "query=fish" for a in argv[1:]) else " "
        print(sep.join(name for name in COMMANDS if name.startswith(typed)))
        return 0
    if words[1] == "run":
        return run(argv)
    print()  # report, export, bench: their arguments are file names and key=value options
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``maskmtl COMMAND ARGS ...`` on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"{USAGE}\nmaskmtl: error: expected a command: {', '.join(COMMANDS)} (maskmtl --help)",
              file=sys.stderr)
        return 2
    first, rest = argv[0], argv[1:]
    if first in ("-h", "--help"):
        print(help_text())
        return 0
    if first in SHELL_COMPLETION:
        return complete(argv)
    if first not in COMMANDS:
        near = difflib.get_close_matches(first, COMMANDS, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        print(f"{USAGE}\nmaskmtl: error: unknown command {first!r}: expected one of {', '.join(COMMANDS)}{hint}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[first][0](rest)
    except SystemExit as e:  # argparse's usage errors (status 2) and --help (0), a tool's own exit
        return exit_status(e)


if __name__ == "__main__":
    sys.exit(main())
