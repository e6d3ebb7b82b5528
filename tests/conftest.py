"""Shared fixtures: the reference fixture (golden outputs of the official implementation)."""

from __future__ import annotations

import gc
import os

# The tests are CPU programs (TPU programs are compiled for libtpu's compile-only devices, which need
# no accelerator): JAX must not probe for a TPU, which libtpu, installed with the test extra, would
# otherwise do at every start, here and in every subprocess a test starts.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest

from experiments.reference_check import DEFAULT_FIXTURE, Fixture, load_fixture

FIXTURE_DIR = DEFAULT_FIXTURE
CHECKPOINT_DIR = FIXTURE_DIR / "checkpoint"


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drops JAX's compiled programs after each test module. XLA:CPU maps memory for every
    executable; the whole suite compiles enough of them to exceed the kernel's default limit of
    65530 memory maps per process, at which point compilation aborts."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def reference() -> Fixture:
    """Config, float32 parameters, arrays and cases of the tiny reference fixture."""
    return load_fixture(FIXTURE_DIR)


@pytest.fixture(scope="session")
def text_model_dir(tmp_path_factory):
    """A small random Huginn model with the real Huginn-0125 tokenizer (65536 ids) in Hugging Face
    layout: config.json, model.safetensors and the tokenizer files (see tests/text_model.py)."""
    from tests.text_model import write_text_model

    return write_text_model(tmp_path_factory.mktemp("text-model"))


def reference_cases(kind: str, prefix: str = "") -> list[dict]:
    """The fixture's cases of one kind whose name starts with `prefix` (read at collection time)."""
    import json

    with open(FIXTURE_DIR / "cases.json", encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    return [c for c in cases if c["kind"] == kind and c.get("name", "").startswith(prefix)]


def unequal_prompts(reference: Fixture) -> list[list[int]]:
    """Three prompts of unequal lengths (12, 7, 9 tokens) made from the fixture's prompt."""
    prompt = reference.arrays["gen_prompt"][0].tolist()
    return [prompt, prompt[3:10], list(reversed(prompt))[:9]]
