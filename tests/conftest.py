"""Shared fixtures: the real data beside the repo, and one prepared copy of the bundled student."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "alpaca_dev_4000.jsonl").exists():
        raise RuntimeError(f"{SHARED_DATA}: the shared data the tests use is missing (../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def prepared_student(model_cache) -> Path:
    from pipeline.models import prepare_bundled_student

    return prepare_bundled_student(model_cache)
