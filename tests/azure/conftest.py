"""Fixtures of the Azure tests. The Azurite emulator lives in azurite.py (this folder is on sys.path)."""

from azurite import azurite  # noqa: F401  (the session fixture)
