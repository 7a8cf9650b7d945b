"""Shared test setup: an isolated model cache, offline Hub, the path of ../shared/data."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """Embedded models (tiny, stories260k) are built once per test session into a private cache."""
    cache = os.environ.get("PHI3LOCAL_TEST_CACHE") or str(tmp_path_factory.mktemp("phi3local-cache"))
    os.environ["PHI3LOCAL_CACHE"] = cache
    return Path(cache)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"tests need the shared artifacts at {SHARED_DATA}"
    return SHARED_DATA
