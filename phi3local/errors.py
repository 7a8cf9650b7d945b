"""The one base class of every error the package raises on purpose.

Its message is written for the user (it names the file, line, key or path and what to do), so the CLI
prints it as one line and exits non-zero; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class Phi3LocalError(Exception):
    """An error meant for the user: bad input, a refused action, a failed check."""

    # Exit status of the CLI for this kind of error (2: the command line or recipe is wrong).
    exit_code = 1
