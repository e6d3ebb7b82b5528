"""Shared fixtures: the reference fixture (golden outputs of the official implementation)."""

from __future__ import annotations

import pytest

from experiments.reference_check import DEFAULT_FIXTURE, Fixture, load_fixture

FIXTURE_DIR = DEFAULT_FIXTURE
CHECKPOINT_DIR = FIXTURE_DIR / "checkpoint"


@pytest.fixture(scope="session")
def reference() -> Fixture:
    """Config, float32 parameters, arrays and cases of the tiny reference fixture."""
    return load_fixture(FIXTURE_DIR)


def reference_cases(kind: str, prefix: str = "") -> list[dict]:
    """The fixture's cases of one kind whose name starts with `prefix` (read at collection time)."""
    import json

    with open(FIXTURE_DIR / "cases.json", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    return [c for c in cases if c["kind"] == kind and c.get("name", "").startswith(prefix)]
