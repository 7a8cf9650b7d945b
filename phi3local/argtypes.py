"""Argument types the command-line parsers share (argparse turns their errors into usage errors)."""

from __future__ import annotations

import argparse
import shutil

HELP_WIDTH = 80  # --help lines, however wide the terminal (argparse alone fills COLUMNS)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A share in (0, 1], as top_p is."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help wrapped at the terminal's width, at most HELP_WIDTH columns, showing each option's default
    (when it has a value worth showing: not None, not False)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        # argparse keeps 2 columns free when it reads the terminal's width itself: so does this.
        width = width or min(shutil.get_terminal_size().columns, HELP_WIDTH) - 2
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, argparse.SUPPRESS) or action.option_strings == []
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class CommandHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The top-level --help: its epilog holds a command to copy, printed as written (never wrapped)."""
