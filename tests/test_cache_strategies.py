"""Every KV-cache strategy of the reference through the samplers: the 21 cases of the
huginn-reference-cache fixture token-exact with the reference's cache memory, the reference
check's handling of both fixtures, `exit_threshold="auto"`, and randomized lookups' key."""

import ast
import inspect
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import reference_check
from experiments.reference_check import CACHE_FIXTURE, load_fixture, run_case
from huginn_jax.exit_criteria import get_criterion
from huginn_jax.kv_cache import CacheStrategy
from samplers import (generate_diffusion_style, generate_minimal, generate_speculative,
                      generate_with_adaptive_compute)
from samplers.dispatch import SAMPLERS, resolve
from tests.conftest import FIXTURE_DIR

with open(CACHE_FIXTURE / "cases.json", encoding="utf-8") as f:
    CACHE_CASES = json.load(f)["cases"]


@pytest.fixture(scope="module")
def cache_fixture():
    return load_fixture(CACHE_FIXTURE)


def test_the_fixture_covers_every_strategy_of_the_reference_and_the_official_demo():
    strategies = {c["options"]["cache_lookup_strategy"] for c in CACHE_CASES}
    assert len(CACHE_CASES) == 21
    for name in ("latest-m4-compress-s8", "latest-m4-compress-s16", "latest-m4-compress-r4",
                 "latest-m4-compress-anchor", "available-m4", "always-last-m4", "skip"):
        assert name in strategies
    assert all("cache_memory_mb" in c for c in CACHE_CASES)


@pytest.mark.parametrize("case", CACHE_CASES, ids=lambda c: c["name"])
def test_reference_case_tokens_and_cache_memory(cache_fixture, case):
    """Greedy tokens identical, and `cache_memory_mb` equal to the reference's
    `past_key_values.get_memory_usage()` (keys and values actually stored, MiB). Batch 1, as in the
    reference, where the two count the same entries."""
    result = run_case(cache_fixture, case)
    assert result.passed, result.detail


def test_a_case_that_cannot_run_or_differs_in_memory_fails_and_says_why(cache_fixture):
    case = CACHE_CASES[0]
    unknown = dict(case, options=dict(case["options"], cache_lookup_strategy="latest-m4-compress-q4"))
    result = run_case(cache_fixture, unknown)
    assert not result.passed and "cannot run: ValueError: malformed cache_lookup_strategy" in result.detail
    wrong_memory = dict(case, cache_memory_mb=case["cache_memory_mb"] * 2)
    result = run_case(cache_fixture, wrong_memory)  # the first case's shapes are compiled by now
    assert not result.passed and "cache memory differs" in result.detail


def test_the_reference_check_runs_both_fixtures_by_default():
    assert reference_check.FLAGS["fixture_dir"].default == [str(FIXTURE_DIR), str(CACHE_FIXTURE)]


def test_auto_thresholds_are_the_reference_evaluators_defaults():
    """The defaults of the reference's exit evaluators for exit_threshold="auto"."""
    reference_defaults = {"entropy-diff": 1e-3, "latent-diff": 0.03, "cosine": 1e-3, "kl": 1e-3, "minp-kl": 1e-5,
                          "argmax-stability": 5}
    for name, threshold in reference_defaults.items():
        assert get_criterion(name).threshold("auto") == threshold, name


OPTIONS = dict(max_new_tokens=24, init_scale=0.0, stop_token_ids=(), num_steps=16)


def test_randomized_lookups_need_a_key_and_follow_it(cache_fixture):
    """`randomized` draws from the call's key: it is required, the same key repeats the tokens,
    and other keys change them (adaptive exits leave positions for it to pick from)."""
    prompt = cache_fixture.arrays["gen_prompt"]
    options = dict(config=cache_fixture.config, criterion="kl", exit_threshold=0.01,
                   cache_lookup_strategy="randomized", **OPTIONS)
    with pytest.raises(ValueError, match="cache_lookup_strategy='randomized'.* pass a PRNG key"):
        generate_with_adaptive_compute(cache_fixture.params, prompt, **options)
    runs = [generate_with_adaptive_compute(cache_fixture.params, prompt, key=jax.random.key(seed), **options)
            for seed in (0, 0, 1, 2, 3)]
    assert runs[0].sequences() == runs[1].sequences()
    assert len({tuple(run.sequences()[0]) for run in runs}) > 1


def test_speculative_decoding_takes_compression_rules_and_reports_memory(cache_fixture):
    """Exact verification reproduces static AR under compress-s8 too, and the cache holds the same
    entries: every accepted position at every step of the verifying depth."""
    prompt = cache_fixture.arrays["gen_prompt"]
    options = dict(config=cache_fixture.config, cache_lookup_strategy="latest-m4-compress-s8", **OPTIONS)
    static = generate_minimal(cache_fixture.params, prompt, **options)
    spec = generate_speculative(cache_fixture.params, prompt, draft_steps=4, lookahead_for_draft=4, **options)
    assert spec.sequences() == static.sequences()
    np.testing.assert_array_equal(spec.stats["cache_memory_mb"], static.stats["cache_memory_mb"])
    assert static.stats["cache_memory_mb"][0] == CACHE_CASES[0]["cache_memory_mb"]  # the fixture's s8 case
    assert (spec.stats["cache_allocated_mb"] > spec.stats["cache_memory_mb"]).all()


@pytest.mark.parametrize("sampler", [generate_minimal, generate_with_adaptive_compute, generate_speculative,
                                     generate_diffusion_style], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name, message", [
    ("latest-m4-compress-s0", "malformed cache_lookup_strategy 'latest-m4-compress-s0'"),
    ("latest-m4-compress-sx", "malformed cache_lookup_strategy 'latest-m4-compress-sx'"),
    ("latest-m4-compress-s6", "'latest-m4-compress-s6' cannot be used with this model"),
    ("latest-m4-compress-s16-extra", "malformed cache_lookup_strategy"),
])
def test_every_sampler_refuses_a_bad_strategy_by_name(cache_fixture, sampler, name, message):
    """One parser for every sampler: the error names the option before anything runs (4 core layers
    here, so compress-s6 would make core layers read each other's keys)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        sampler(cache_fixture.params, cache_fixture.arrays["gen_prompt"], config=cache_fixture.config,
                max_new_tokens=2, cache_lookup_strategy=name)


README = Path(__file__).resolve().parents[1] / "README.md"


def demo_table_calls() -> list[ast.Call]:
    """The huginn-jax column's `generate(...)` calls in the README's table of the official demo."""
    text = README.read_text(encoding="utf-8")
    table = text.split("| official demo (PyTorch) | huginn-jax |", 1)[1].split("\n\n", 1)[0]
    calls = []
    for row in table.splitlines()[2:]:
        ours = row.split(" | ", 1)[1]
        calls += [ast.parse(code, mode="eval").body for code in re.findall(r"`(generate\(.*?\))`", ours)]
    return calls


def test_the_readme_shows_every_call_of_the_official_demo_with_options_its_sampler_takes():
    """Each of the demo's strategy and exit settings has a row, and each row's call selects the
    sampler the reference's `model.generate` selects, with option names and values it accepts
    (`common` holds config, num_steps, max_new_tokens, stop_strings, tokenizer, streamer, key)."""
    calls = demo_table_calls()
    settings = [{k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg} for call in calls]
    for demo in ({}, {"continuous_compute": False, "criterion": "latent-diff", "exit_threshold": "auto",
                      "cache_lookup_strategy": "latest-m4"},
                 {"criterion": "argmax-stability", "exit_threshold": 10, "cache_lookup_strategy": "latest-m4"},
                 {"cache_lookup_strategy": "latest-m4-compress-s16"},
                 {"cache_lookup_strategy": "latest-m4-compress-anchor"},
                 {"criterion": "latent-diff", "exit_threshold": "auto",
                  "cache_lookup_strategy": "latest-m4-compress-s16"}):
        assert demo in settings, demo
    common = {"num_steps", "max_new_tokens", "stop_strings", "tokenizer", "streamer", "key"}
    for options in settings:
        sampler = resolve(None, options)
        assert sampler == ("generate_with_adaptive_compute" if "criterion" in options else "generate_minimal")
        taken = set(inspect.signature(SAMPLERS[sampler]).parameters)
        assert set(options) | common <= taken, options
        CacheStrategy.parse(options.get("cache_lookup_strategy", "full"), 4)  # Huginn-0125's 4 core layers
        if "criterion" in options:
            assert get_criterion(options["criterion"]).threshold(options["exit_threshold"]) > 0
