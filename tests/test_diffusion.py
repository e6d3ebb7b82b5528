"""The diffusion forcing sampler: the reference's cases with statistics, batching, the ring buffer,
stops, analysis tablets, presets and bad options."""

import jax
import numpy as np
import pytest

from experiments.reference_check import run_case
from samplers import DIFFUSION_PRESETS, generate_diffusion_style, generate_minimal
from samplers.streaming import collect
from tests.conftest import reference_cases, unequal_prompts

DIFFUSION_CASES = reference_cases("generate", "df_")


def test_every_freeze_strategy_is_covered():
    strategies = {c["options"]["freeze_strategy"] for c in DIFFUSION_CASES}
    assert strategies == {"latent-diff", "latent-acceleration-1", "latent-acceleration-2", "token-stability", "fixed"}


@pytest.mark.parametrize("case", DIFFUSION_CASES, ids=lambda c: c["name"])
def test_reference_case_tokens_and_statistics(reference, case):
    result = run_case(reference, case)
    assert result.passed, result.detail


ROW_STATS_EXCEPT = "cache_allocated_mb"
"""The one statistic of a row that depends on the run's shapes: its share of the cache's buffers,
which hold the batch's longest prompt and the wavefront's ring (the filled memory does not)."""

NOISY = dict(max_new_tokens=20, num_steps=8, inner_recurrence=2, state_noise_mixing=0.5, ema_embeds=0.1,
             exit_t=0.05, freeze_strategy="latent-diff", max_wavefront=16, init_scale=1.0, stop_token_ids=())


def test_batch_equals_each_prompt_alone_even_with_random_states(reference):
    """Each sequence draws its randomness from (key, step, position), so a batch is exactly its rows."""
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, key=jax.random.key(3), **NOISY)
    batched = generate_diffusion_style(reference.params, prompts, **options)
    for i, prompt in enumerate(prompts):
        alone = generate_diffusion_style(reference.params, [prompt], **options)
        assert batched.sequences()[i] == alone.sequences()[0], f"prompt {i}"
        for name, values in alone.stats.items():
            if name != ROW_STATS_EXCEPT:
                assert batched.stats[name][i] == values[0], f"prompt {i}: {name}"
    assert len(set(batched.stats["diffusion_steps"].tolist())) > 1  # the rows really ran on their own


def test_the_ring_buffer_size_does_not_matter_while_the_wavefront_fits(reference):
    """60 tokens through a ring of 6 states (it wraps ten times) equal the same run on a ring of 24."""
    options = dict(config=reference.config, max_new_tokens=60, num_steps=8, inner_recurrence=4,
                   freeze_strategy="fixed", state_noise_mixing=0.5, ema_embeds=0.1, init_scale=1.0,
                   key=jax.random.key(5), stop_token_ids=())
    small = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], max_wavefront=6, **options)
    large = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], max_wavefront=24, **options)
    assert small.stats["num_standing_waves"][0] == large.stats["num_standing_waves"][0] == 0
    assert small.lengths[0] == 60 and small.sequences() == large.sequences()
    for name in set(small.stats) - {ROW_STATS_EXCEPT}:
        assert np.array_equal(small.stats[name][0], large.stats[name][0]), name


def test_a_capped_wavefront_stands_and_still_finishes(reference):
    options = dict(config=reference.config, max_new_tokens=30, num_steps=8, inner_recurrence=1, exit_t=1e-4,
                   state_noise_mixing=0.0, ema_embeds=0.0, init_scale=0.0, max_wavefront=4, stop_token_ids=())
    out = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], **options)
    assert out.stats["num_standing_waves"][0] > 0 and out.lengths[0] == 30


def test_stop_tokens_end_each_sequence_of_a_batch(reference):
    prompts = unequal_prompts(reference)
    options = dict(config=reference.config, key=jax.random.key(3), **{**NOISY, "stop_token_ids": None})
    free = generate_diffusion_style(reference.params, prompts, **{**options, "stop_token_ids": ()}).sequences()
    stops = {free[0][5], free[1][2]}
    stopped = generate_diffusion_style(reference.params, prompts, **{**options, "stop_token_ids": sorted(stops)})
    for row, (full_run, got) in enumerate(zip(free, stopped.sequences())):
        first = next((i for i, t in enumerate(full_run) if t in stops), len(full_run) - 1)
        assert got == full_run[: first + 1], f"sequence {row}"


def test_reference_compatible_stops_miss_early_stop_tokens(reference):
    """The reference checks stops only after num_steps sampler steps: an early stop token is missed."""
    prompt = reference.arrays["gen_prompt"]
    options = dict(config=reference.config, key=jax.random.key(3), **NOISY)
    free = generate_diffusion_style(reference.params, prompt, **options).sequences()[0]
    stop = free[1]
    ours = generate_diffusion_style(reference.params, prompt, **{**options, "stop_token_ids": [stop]})
    compatible = generate_diffusion_style(reference.params, prompt, reference_compatible=True,
                                          **{**options, "stop_token_ids": [stop]})
    assert ours.sequences()[0] == free[: free.index(stop) + 1]
    assert len(compatible.sequences()[0]) > len(ours.sequences()[0])


def test_analysis_tablets_record_every_step(reference):
    options = dict(config=reference.config, key=jax.random.key(3), return_analysis_tablets=80, **NOISY)
    out = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], **options)
    steps, frozen = int(out.stats["diffusion_steps"][0]), len(out.stats["recurrence_per_position"][0])
    tablets = {name: values[0] for name, values in out.tablets.items()}
    assert tablets["token_tablet"].shape == tablets["frozen_tablet"].shape and len(tablets["token_tablet"]) == 80
    assert 20 < steps < 80
    final = reference.arrays["gen_prompt"][0].tolist() + out.sequences()[0]
    # the last step may freeze past max_new_tokens; the output stops there, the tablet does not
    assert frozen >= len(final) and tablets["frozen_tablet"][steps - 1, :len(final)].tolist() == final
    assert tablets["counter_tablet"][steps - 1, :frozen].tolist() == out.stats["recurrence_per_position"][0]
    assert tablets["stability_tablet"][steps - 1, :frozen].tolist() == out.stats["token_stable_per_position"][0]
    assert not tablets["token_tablet"][steps:].any()  # rows after the last step stay empty
    counts = tablets["counter_tablet"][:steps].sum(axis=1)
    assert (np.diff(counts) > 0).all()  # every step adds recurrence somewhere
    # The latent-diff criterion is judged inside the wavefront, at positions already recurred on,
    # from the second step on; recording it changes nothing.
    criterion = tablets["criterion_tablet"]
    judged = ~np.isnan(criterion)
    assert judged[1:steps].any(axis=1).all() and not judged[steps:].any()
    assert (criterion[judged] >= 0).all()
    assert (tablets["counter_tablet"][judged] > 0).all()
    plain = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                                     key=jax.random.key(3), **NOISY)
    assert plain.tablets is None and plain.sequences() == out.sequences()
    np.testing.assert_array_equal(plain.stats["num_cache_clears"], out.stats["num_cache_clears"])


def test_rules_without_a_latent_criterion_leave_the_criterion_tablet_empty(reference):
    options = dict(NOISY, freeze_strategy="fixed", max_new_tokens=8)
    out = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                                   key=jax.random.key(3), return_analysis_tablets=True, **options)
    assert np.isnan(out.tablets["criterion_tablet"]).all() and out.tablets["counter_tablet"].any()


def test_streaming_hands_over_each_newly_frozen_token_once(reference):
    streamer, streamed = collect()
    options = dict(config=reference.config, key=jax.random.key(3), **NOISY)
    out = generate_diffusion_style(reference.params, unequal_prompts(reference)[:2], streamer=streamer, **options)
    assert streamed == out.sequences()


def test_paper_presets(reference):
    assert DIFFUSION_PRESETS["paper-main"]["state_noise_mixing"] == 0.0
    assert DIFFUSION_PRESETS["paper-main"]["inner_recurrence"] == 4
    assert DIFFUSION_PRESETS["paper-fast"]["inner_recurrence"] == 2
    out = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                                   max_new_tokens=24, num_steps=8, init_scale=0.0,
                                   **DIFFUSION_PRESETS["paper-main"])
    assert out.lengths[0] == 24


@pytest.mark.parametrize("options, message", [
    (dict(freeze_strategy="latent"), "unknown freeze_strategy 'latent'"),
    (dict(inner_recurrence=0), "inner_recurrence must be >= 1"),
    (dict(headway=0), "headway must be >= 1"),
    (dict(max_wavefront=2, headway=2), "max_wavefront must be > headway=2"),
    (dict(state_noise_mixing=1.5), "state_noise_mixing must be <= 1.0"),
    (dict(ema_embeds=1.0), "ema_embeds must be < 1.0"),
    (dict(cache_lookup_strategy="latest-m8"), "unknown cache_lookup_strategy"),
    (dict(full_prefill=False, max_wavefront=8), "needs max_wavefront >= 12"),
    (dict(max_new_tokens=200), "more than the context of 256"),
    (dict(init_scale=1.0), "pass a PRNG key"),
])
def test_invalid_options_are_named(reference, options, message):
    options = {"max_new_tokens": 8, "init_scale": 0.0, **options}
    with pytest.raises(ValueError, match=message):
        generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], config=reference.config,
                                 **options)


def test_switching_the_freeze_rule_does_not_recompile(reference):
    """The rule is a traced setting: all five run through the same compiled programs (a wavefront
    of at most 4 positions runs on one window, so one start and one phase program at most)."""
    from samplers.diffusion import FREEZE_STRATEGIES, loop

    options = dict(config=reference.config, max_new_tokens=10, num_steps=4, inner_recurrence=2, max_wavefront=4,
                   init_scale=0.0, state_noise_mixing=0.5, exit_t=0.05, max_diffusion_steps=40, stop_token_ids=())
    before = (loop.start._cache_size(), loop.run_phase._cache_size())
    steps = set()
    for rule in FREEZE_STRATEGIES:
        out = generate_diffusion_style(reference.params, reference.arrays["gen_prompt"], freeze_strategy=rule,
                                       **options)
        steps.add(int(out.stats["diffusion_steps"][0]))
    assert loop.start._cache_size() - before[0] <= 1 and loop.run_phase._cache_size() - before[1] <= 1
    assert len(steps) > 1  # the rules really decided differently


def test_a_stop_token_from_the_prefill_ends_generation(reference):
    """The prefill's token is frozen at once and checked like any other (static AR's first token)."""
    prompt = reference.arrays["gen_prompt"]
    first = generate_minimal(reference.params, prompt, config=reference.config, max_new_tokens=1, num_steps=8,
                             init_scale=0.0).sequences()[0]
    options = dict(config=reference.config, max_new_tokens=12, num_steps=8, init_scale=0.0,
                   freeze_strategy="fixed", stop_token_ids=first)
    assert generate_diffusion_style(reference.params, prompt, **options).sequences() == [first]
    # the reference checks stops only after num_steps sampler steps, and misses it
    compatible = generate_diffusion_style(reference.params, prompt, reference_compatible=True, **options)
    assert len(compatible.sequences()[0]) > 1


def test_a_batch_across_attention_views_equals_each_prompt_alone(reference):
    """Long texts leave the first attention view (128 positions) at different steps per sequence;
    batched or alone, with random states, noise and filler, each sequence is the same."""
    prompts = [p for p in unequal_prompts(reference) if len(p) > 8]  # 12 and 9 tokens: one padded shape
    options = dict(config=reference.config, max_new_tokens=124, num_steps=4, inner_recurrence=2, headway=2,
                   freeze_strategy="fixed", state_noise_mixing=0.5, max_wavefront=10, init_scale=1.0,
                   key=jax.random.key(7), stop_token_ids=())
    batched = generate_diffusion_style(reference.params, prompts, **options)
    assert (batched.stats["gen_seq_length"] > 128).all()
    for i, prompt in enumerate(prompts):
        alone = generate_diffusion_style(reference.params, [prompt], **options)
        assert batched.sequences()[i] == alone.sequences()[0], f"prompt {i}"
        for name, values in alone.stats.items():
            if name != ROW_STATS_EXCEPT:
                assert np.array_equal(batched.stats[name][i], values[0]), f"prompt {i}: {name}"
