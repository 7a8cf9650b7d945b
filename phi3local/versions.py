"""Installed versions of the libraries a run depends on (saved beside checkpoints and exports)."""

from __future__ import annotations

import importlib.metadata as md


def package_versions(names: tuple[str, ...], include_missing: bool = True) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            if include_missing:
                out[name] = "not installed"
    return out
