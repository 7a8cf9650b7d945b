"""`--help` as a user reads it: every command's help fits 80 columns on any terminal and shows its defaults."""

from __future__ import annotations

import pytest

COMMANDS = ["prepare", "train", "plan", "eval", "merge", "export", "chat", "serve", "safety", "monitor", "doctor",
            "bench", "azure"]


@pytest.mark.parametrize("columns", ["60", "200"])
def test_every_help_fits_80_columns_and_commands_are_whole(user, columns):
    user.env["COLUMNS"] = columns
    for command in [None, *COMMANDS]:
        out = user.run(*([command] if command else []), "--help").ok().out
        # The only line allowed past 80 columns is a command to copy, which is never wrapped.
        wide = [ln for ln in out.splitlines() if len(ln) > 80 and not ln.strip().startswith(user.script)]
        assert not wide, (command, wide)


def test_serve_and_export_help_show_their_defaults(user):
    serve = user.run("serve", "--help").ok().out
    assert "(default: 5001)" in serve and "(default: 127.0.0.1)" in serve and "(default: 512)" in serve
    export = user.run("export", "--help").ok().out
    assert "(default: int4)" in export and "(default: cpu)" in export
