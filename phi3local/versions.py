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


# What an export's report (merge_report.json, export_report.json) records.
EXPORT_PACKAGES = ("torch", "transformers", "peft", "onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir")


def export_versions() -> dict[str, str]:
    return package_versions(EXPORT_PACKAGES, include_missing=False)
