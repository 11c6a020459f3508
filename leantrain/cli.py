"""The command line: ``leantrain train [--config FILE.toml] [--recipe NAME] [--section.key=value ...]``."""

from __future__ import annotations

import sys
import textwrap
import warnings

from .errors import UserError

USAGE = """usage: leantrain train [--config FILE.toml] [--recipe NAME] [--section.key=value ...]

Train a Llama-style model. Every key below can come from the TOML file ([section] tables) or the
command line (which wins). --recipe sets a named group of precision keys (see precision.py):
fp32, bf16-mixed, bf16, bf16-fp32state, bf16-sr, bf16-kahan, bf16-int8.
"""


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return "leantrain: warning: " + textwrap.fill(str(message), 100, subsequent_indent="  ") + "\n"


def _train(args: list[str]) -> int:
    from .config import help_text, load_config, parse_overrides

    if "-h" in args or "--help" in args:
        print(USAGE)
        print(help_text())
        return 0
    config_path = None
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise UserError("--config needs the path of a TOML file, e.g. --config my_run.toml.")
        config_path = args[i + 1]
        args = args[:i] + args[i + 2:]
    else:
        for a in args:
            if a.startswith("--config="):
                config_path = a.split("=", 1)[1]
        args = [a for a in args if not a.startswith("--config=")]
    cfg = load_config(config_path, parse_overrides(args))

    from .train import train

    train(cfg)
    return 0


COMMANDS = {"train": _train}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: leantrain {{{','.join(COMMANDS)}}} [options]   (leantrain COMMAND --help for its options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"leantrain: error: unknown command '{command}'; available: {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except UserError as e:
        print("leantrain: error: " + textwrap.fill(str(e), 100, subsequent_indent="  "), file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
