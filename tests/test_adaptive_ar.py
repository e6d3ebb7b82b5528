"""Adaptive-depth AR generation: the reference's cases, plug-in criteria, batching, stops, errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reference_check import run_case
from huginn_jax import forward
from samplers import ExitCriterion, generate_minimal, generate_with_adaptive_compute
from tests.conftest import reference_cases, unequal_prompts

ADAPTIVE_CASES = reference_cases("generate", "ar_adaptive_")


def test_every_criterion_and_lookup_strategy_is_covered():
    names = {c["name"] for c in ADAPTIVE_CASES}
    for criterion in ("latent-diff", "entropy-diff", "kl", "minp-kl", "argmax-stability", "cosine"):
        for strategy in ("latest-m4", "full"):
            assert f"ar_adaptive_{criterion}_{strategy}" in names


@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=lambda c: c["name"])
def test_reference_case_token_exact(reference, case):
    result = run_case(reference, case)
    assert result.passed, result.detail


def exit_after(checks: int) -> ExitCriterion:
    """A plug-in criterion that exits at its `checks`-th check: its state counts the checks."""
    return ExitCriterion(
        name=f"after-{checks}", default_threshold=checks, needs_logits=False,
        init=lambda latents, real, vocab: jnp.zeros((latents.shape[0],), jnp.int32),
        update=lambda count, latents, real, logits: (count + 1, count + 1),
        exits=lambda value, threshold: value >= threshold)


@pytest.mark.parametrize("strategy", ["full", "latest-m4"])
def test_a_plugged_in_criterion_that_always_exits_at_step_3_is_static_depth_3(reference, strategy):
    prompt = reference.arrays["gen_prompt"]
    options = dict(config=reference.config, max_new_tokens=12, init_scale=0.0, stop_token_ids=())
    adaptive = generate_with_adaptive_compute(reference.params, prompt, criterion=exit_after(3), num_steps=8,
                                              cache_lookup_strategy=strategy, **options)
    static = generate_minimal(reference.params, prompt, num_steps=3, cache_lookup_strategy="full", **options)
    assert (adaptive.recurrence_steps == 3).all()
    assert adaptive.sequences() == static.sequences()


def test_criterion_none_runs_every_step_like_static_ar(reference):
    prompt = reference.arrays["gen_prompt"]
    options = dict(config=reference.config, max_new_tokens=12, init_scale=0.0, stop_token_ids=(), num_steps=5)
    adaptive = generate_with_adaptive_compute(reference.params, prompt, criterion="none", **options)
    assert (adaptive.recurrence_steps == 5).all()
    assert adaptive.sequences() == generate_minimal(reference.params, prompt, **options).sequences()


@pytest.mark.parametrize("strategy", ["full", "latest-m4"])
def test_batch_equals_each_prompt_alone_with_per_sequence_exits(reference, strategy):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, max_new_tokens=12, init_scale=0.0, stop_token_ids=(), num_steps=16,
                   criterion="kl", exit_threshold=0.01, cache_lookup_strategy=strategy)
    batched = generate_with_adaptive_compute(reference.params, prompts, **options)
    depths = set()
    for i, prompt in enumerate(prompts):
        alone = generate_with_adaptive_compute(reference.params, [prompt], **options)
        assert batched.sequences()[i] == alone.sequences()[0], f"prompt {i}"
        np.testing.assert_array_equal(batched.recurrence_steps[i], alone.recurrence_steps[0])
        depths |= set(alone.recurrence_steps[0].tolist())
    assert len(depths) > 2  # the sequences really exit at different depths


def test_stop_tokens_end_each_sequence(reference):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, max_new_tokens=12, init_scale=0.0, num_steps=16, criterion="kl",
                   exit_threshold=0.01)
    free = generate_with_adaptive_compute(reference.params, prompts, stop_token_ids=(), **options).sequences()
    stops = {free[0][4], free[2][2]}
    stopped = generate_with_adaptive_compute(reference.params, prompts, stop_token_ids=sorted(stops), **options)
    for row, (full_run, got) in enumerate(zip(free, stopped.sequences())):
        first = next((i for i, t in enumerate(full_run) if t in stops), len(full_run) - 1)
        assert got == full_run[: first + 1], f"sequence {row}"


@pytest.mark.parametrize("options, message", [
    (dict(criterion="entropy"), "unknown exit criterion 'entropy'"),
    (dict(check_criterion_every_n_steps=0), "check_criterion_every_n_steps must be >= 1"),
    (dict(min_steps=-1), "min_steps must be >= 0"),
    (dict(cache_lookup_strategy="latest"), "unknown cache_lookup_strategy"),
])
def test_invalid_options_are_named(reference, options, message):
    with pytest.raises(ValueError, match=message):
        generate_with_adaptive_compute(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                                       max_new_tokens=4, init_scale=0.0, **options)


def test_recorded_exit_values_explain_every_exit_and_change_no_token(reference):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, max_new_tokens=12, init_scale=0.0, stop_token_ids=(), num_steps=16,
                   criterion="kl", exit_threshold=0.01, min_steps=2, check_criterion_every_n_steps=2)
    plain = generate_with_adaptive_compute(reference.params, prompts, **options)
    recorded = generate_with_adaptive_compute(reference.params, prompts, record_exit_values=True, **options)
    assert plain.exit_values is None
    assert recorded.sequences() == plain.sequences()
    np.testing.assert_array_equal(recorded.recurrence_steps, plain.recurrence_steps)
    values = recorded.exit_values
    assert values.shape == (len(prompts), 12, 16)
    for row, n in enumerate(recorded.lengths):
        for i in range(n):
            depth = recorded.recurrence_steps[row, i]
            checked = np.flatnonzero(~np.isnan(values[row, i]))  # steps 2, 4, ... up to the exit
            assert set(checked) <= {2, 4, 6, 8, 10, 12, 14}
            assert checked.max() == (depth - 1 if depth < 16 else 14)
            below = values[row, i, checked] < 0.01
            assert not below[:-1].any() and below[-1] == (depth < 16)  # it exits at the first check below
        assert np.isnan(values[row, n:]).all()


def test_prefill_latent_diff_values_match_the_forward_trajectory(reference):
    """The prompt's recorded latent-diff values are the relative change between consecutive states
    of `forward(return_trajectory=True)`, averaged over the prompt."""
    prompt = reference.arrays["gen_prompt"]
    out = generate_with_adaptive_compute(reference.params, prompt, config=reference.config, max_new_tokens=1,
                                         init_scale=0.0, num_steps=8, criterion="latent-diff", exit_threshold=0.0,
                                         record_exit_values=True)
    trajectory = np.asarray(forward(reference.params, prompt, 8, config=reference.config, init_scale=0.0,
                                    return_trajectory=True).trajectory, np.float64)
    previous = np.concatenate([np.zeros_like(trajectory[:1]), trajectory[:-1]])
    change = np.linalg.norm(trajectory - previous, axis=-1) / np.linalg.norm(trajectory, axis=-1)
    np.testing.assert_allclose(out.exit_values[0, 0], change.mean(axis=(1, 2)), rtol=1e-5)
