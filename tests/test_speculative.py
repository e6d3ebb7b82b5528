"""Self-speculative decoding: the reference's cases, exactness against static AR, batching, stops, errors."""

import jax
import numpy as np
import pytest

from experiments.reference_check import run_case
from samplers import SamplingConfig, generate, generate_minimal, generate_speculative
from samplers.common import NO_TOKEN
from samplers.streaming import collect
from tests.conftest import reference_cases, unequal_prompts

SPECULATIVE_CASES = reference_cases("generate", "spec_")


def test_exact_and_relaxed_verification_are_covered():
    thresholds = {c["options"]["verification_threshold"] for c in SPECULATIVE_CASES}
    assert any(t >= 1 for t in thresholds) and any(t < 1 for t in thresholds)


@pytest.mark.parametrize("case", SPECULATIVE_CASES, ids=lambda c: c["name"])
def test_reference_case_token_exact(reference, case):
    result = run_case(reference, case)
    assert result.passed, result.detail


OPTIONS = dict(max_new_tokens=20, init_scale=0.0, stop_token_ids=(), num_steps=8)


@pytest.mark.parametrize("strategy, continuous", [("full", False), ("latest-m4-compress-s4", True)])
def test_greedy_exact_verification_reproduces_static_ar_at_the_verifying_depth(reference, strategy, continuous):
    """Exact-match verification only ever keeps tokens the deep pass would have chosen itself, so the
    output is static AR's at num_steps whatever the drafts were (continuous compute changes drafts only)."""
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, cache_lookup_strategy=strategy, **OPTIONS)
    static = generate_minimal(reference.params, prompts, **options)
    spec = generate_speculative(reference.params, prompts, draft_steps=2, lookahead_for_draft=3,
                                verification_threshold=1.0, continuous_compute=continuous, **options)
    assert spec.sequences() == static.sequences()
    assert (spec.stats["rounds"] < OPTIONS["max_new_tokens"] - 1).all()  # drafts were accepted


def test_batch_equals_each_prompt_alone_with_per_sequence_acceptance(reference):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, draft_steps=3, lookahead_for_draft=4, verification_threshold=0.5,
                   **OPTIONS)
    batched = generate_speculative(reference.params, prompts, **options)
    acceptances = set()
    for i, prompt in enumerate(prompts):
        alone = generate_speculative(reference.params, [prompt], **options)
        assert batched.sequences()[i] == alone.sequences()[0], f"prompt {i}"
        assert batched.stats["accepted_per_round"][i] == alone.stats["accepted_per_round"][0]
        acceptances.add(tuple(alone.stats["accepted_per_round"][0]))
    assert len(acceptances) > 1  # the sequences really accept differently


def test_statistics_account_for_every_token(reference):
    lookahead = 4
    out = generate_speculative(reference.params, unequal_prompts(reference), config=reference.config, draft_steps=1,
                               lookahead_for_draft=lookahead, **OPTIONS)
    for row, accepted in enumerate(out.stats["accepted_per_round"]):
        assert len(accepted) == out.stats["rounds"][row]
        # The prefill gives one token; a round gives its accepted drafts plus the deep pass's token at
        # a rejection; the last round keeps only what max_new_tokens leaves room for.
        gained = 1 + sum(a if a == lookahead else a + 1 for a in accepted)
        assert out.lengths[row] == OPTIONS["max_new_tokens"] <= gained < OPTIONS["max_new_tokens"] + lookahead
    np.testing.assert_array_equal(out.stats["draft_forward_passes"], out.stats["rounds"] * lookahead)
    np.testing.assert_array_equal(out.stats["verify_forward_passes"], out.stats["rounds"] + 1)


def test_stop_tokens_end_each_sequence_at_its_first_stop(reference):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, draft_steps=3, lookahead_for_draft=4, verification_threshold=0.5,
                   max_new_tokens=16, init_scale=0.0, num_steps=8)
    free = generate_speculative(reference.params, prompts, stop_token_ids=(), **options).sequences()
    stops = {free[0][5], free[2][2]}
    stopped = generate_speculative(reference.params, prompts, stop_token_ids=sorted(stops), **options)
    for row, (full_run, got) in enumerate(zip(free, stopped.sequences())):
        first = next((i for i, t in enumerate(full_run) if t in stops), len(full_run) - 1)
        assert got == full_run[: first + 1], f"sequence {row}"
        assert (stopped.tokens[row, first + 1:] == NO_TOKEN).all()


def test_streaming_callback_sees_every_token_in_order(reference):
    prompts = unequal_prompts(reference)
    streamer, streamed = collect()
    out = generate_speculative(reference.params, prompts, config=reference.config, draft_steps=2,
                               lookahead_for_draft=3, streamer=streamer, **OPTIONS)
    assert streamed == out.sequences()


def test_sampling_is_reproducible_from_its_key(reference):
    hot = SamplingConfig(do_sample=True, temperature=2.0, top_k=0)
    options = dict(config=reference.config, draft_steps=2, lookahead_for_draft=3, max_new_tokens=12, num_steps=4,
                   stop_token_ids=(), sampling=hot)
    prompt = unequal_prompts(reference)[1:2]
    a = generate_speculative(reference.params, prompt, key=jax.random.key(3), **options).tokens
    b = generate_speculative(reference.params, prompt, key=jax.random.key(3), **options).tokens
    c = generate_speculative(reference.params, prompt, key=jax.random.key(4), **options).tokens
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_dispatcher_runs_it_on_its_option_names(reference):
    prompt = reference.arrays["gen_prompt"]
    direct = generate_speculative(reference.params, prompt, config=reference.config, draft_steps=2, **OPTIONS)
    routed = generate(reference.params, prompt, config=reference.config, draft_steps=2, **OPTIONS)
    assert routed.sequences() == direct.sequences()


@pytest.mark.parametrize("options, message", [
    (dict(draft_steps=0), "draft_steps must be >= 1"),
    (dict(lookahead_for_draft=0), "lookahead_for_draft must be >= 1"),
    (dict(verification_threshold=0.0), "verification_threshold must be > 0"),
    (dict(num_steps=2.5), "num_steps must be an integer, got 2.5"),
    (dict(cache_lookup_strategy="latest"), "unknown cache_lookup_strategy"),
])
def test_invalid_options_are_named(reference, options, message):
    with pytest.raises(ValueError, match=message):
        generate_speculative(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                             max_new_tokens=4, init_scale=0.0, **options)


def test_the_lookahead_must_fit_into_the_context(reference):
    prompt = reference.arrays["gen_prompt"]  # 12 tokens, context 256
    with pytest.raises(ValueError, match="plus max_new_tokens=240 plus 7 positions of lookahead exceeds the context"):
        generate_speculative(reference.params, prompt, config=reference.config, max_new_tokens=240,
                             lookahead_for_draft=8, init_scale=0.0)
