"""Static-depth AR generation: the reference's cases, batching, teacher forcing, stops, errors."""

import jax
import numpy as np
import pytest

from experiments.reference_check import run_case
from huginn_jax.model import forward
from samplers import NO_TOKEN, SamplingConfig, generate, generate_minimal
from samplers.streaming import collect
from tests.conftest import reference_cases

AR_CASES = [c for c in reference_cases("generate", "ar_") if "criterion" not in c["options"]]


def test_the_four_static_cases_are_covered():
    assert [c["name"] for c in AR_CASES] == ["ar_fixed", "ar_fixed_4", "ar_continuous", "ar_fixed_kv_share"]


@pytest.mark.parametrize("case", AR_CASES, ids=lambda c: c["name"])
def test_reference_case_token_exact(reference, case):
    result = run_case(reference, case)
    assert result.passed, result.detail


def prompts_of_unequal_length(vocab_size):
    rng = np.random.default_rng(7)
    return [rng.integers(0, vocab_size, n).tolist() for n in (5, 12, 9)]


@pytest.mark.parametrize("strategy", ["full", "latest-m4-compress-s4"])
def test_batch_of_unequal_prompts_equals_each_prompt_alone(reference, strategy):
    prompts = prompts_of_unequal_length(reference.config.vocab_size)
    options = dict(config=reference.config, max_new_tokens=10, num_steps=6, init_scale=0.0,
                   cache_lookup_strategy=strategy, stop_token_ids=())
    batched = generate_minimal(reference.params, prompts, **options)
    for i, prompt in enumerate(prompts):
        alone = generate_minimal(reference.params, np.asarray([prompt]), **options)
        assert batched.sequences()[i] == alone.sequences()[0], f"prompt {i}"
    assert (batched.recurrence_steps == 6).all()


def assert_teacher_forced_argmax(reference, prompts, generated, num_steps):
    for prompt, new in zip(prompts, generated):
        sequence = np.asarray([list(prompt) + new[:-1]])
        logits = forward(reference.params, sequence, num_steps, config=reference.config, init_scale=0.0).logits
        assert np.asarray(logits[0, len(prompt) - 1:].argmax(-1)).tolist() == new


def test_greedy_tokens_are_the_argmax_of_a_teacher_forced_forward(reference):
    prompts = prompts_of_unequal_length(reference.config.vocab_size)
    out = generate_minimal(reference.params, prompts, config=reference.config, max_new_tokens=12, num_steps=5,
                           init_scale=0.0, cache_lookup_strategy="full", stop_token_ids=())
    assert_teacher_forced_argmax(reference, prompts, out.sequences(), 5)


def test_long_generation_across_attention_views_matches_teacher_forcing(reference):
    # 16 + 140 cache positions: decoding switches from a 128-position view to the whole buffer.
    prompt = reference.arrays["gen_prompt"]
    out = generate_minimal(reference.params, prompt, config=reference.config, max_new_tokens=140, num_steps=3,
                           init_scale=0.0, cache_lookup_strategy="full", stop_token_ids=())
    assert out.lengths[0] == 140
    assert_teacher_forced_argmax(reference, prompt, out.sequences(), 3)


def test_stop_tokens_end_each_sequence_at_its_first_stop(reference):
    prompts = prompts_of_unequal_length(reference.config.vocab_size)
    options = dict(config=reference.config, max_new_tokens=16, num_steps=4, init_scale=0.0)
    free = generate_minimal(reference.params, prompts, stop_token_ids=(), **options).sequences()
    stops = {free[0][3], free[1][6]}
    stopped = generate_minimal(reference.params, prompts, stop_token_ids=sorted(stops), **options)
    for row, (full_run, got) in enumerate(zip(free, stopped.sequences())):
        first = next((i for i, t in enumerate(full_run) if t in stops), len(full_run) - 1)
        assert got == full_run[: first + 1], f"sequence {row}"
        assert stopped.lengths[row] == first + 1
        assert (stopped.tokens[row, first + 1:] == NO_TOKEN).all()
        assert (stopped.recurrence_steps[row, first + 1:] == 0).all()


def test_streaming_callback_sees_every_token_in_order(reference):
    prompts = prompts_of_unequal_length(reference.config.vocab_size)
    calls = []
    streamer, streamed = collect()
    out = generate_minimal(reference.params, prompts, config=reference.config, max_new_tokens=8, num_steps=3,
                           init_scale=0.0, stop_token_ids=(), streamer=lambda new: (calls.append(new), streamer(new)))
    assert len(calls) == 8 and all([len(t) for t in new] == [1, 1, 1] for new in calls)
    assert streamed == out.sequences()


def test_sampling_is_reproducible_from_its_key_and_top_k_1_is_greedy(reference):
    prompt = np.asarray([prompts_of_unequal_length(reference.config.vocab_size)[1]])
    options = dict(config=reference.config, max_new_tokens=12, num_steps=4, stop_token_ids=())
    hot = SamplingConfig(do_sample=True, temperature=2.0, top_k=0)
    a = generate_minimal(reference.params, prompt, sampling=hot, key=jax.random.key(3), **options).tokens
    b = generate_minimal(reference.params, prompt, sampling=hot, key=jax.random.key(3), **options).tokens
    c = generate_minimal(reference.params, prompt, sampling=hot, key=jax.random.key(4), **options).tokens
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    greedy = generate_minimal(reference.params, prompt, init_scale=0.0, **options).tokens
    top1 = generate_minimal(reference.params, prompt, init_scale=0.0, key=jax.random.key(5),
                            sampling=SamplingConfig(do_sample=True, top_k=1), **options).tokens
    assert np.array_equal(greedy, top1)


@pytest.mark.parametrize("input_ids, options, error, message", [
    (np.zeros((1, 4), np.float32), {}, ValueError, "integer dtype"),
    (np.zeros((4,), np.int32), {}, ValueError, "rank 1"),
    ([[1, 2], [3.5]], {}, ValueError, "prompt 1 must hold integer token ids"),
    ([[1, 2], []], {}, ValueError, "prompt 1 must be a non-empty"),
    (np.zeros((1, 250), np.int32), {}, ValueError, "plus max_new_tokens=8 exceeds the context of 256"),
    (np.zeros((1, 4), np.int32), {"cache_lookup_strategy": "latest"}, ValueError, "unknown cache_lookup_strategy"),
    (np.zeros((1, 4), np.int32), {"init_scale": 1.0}, ValueError, "pass a PRNG key"),
    (np.zeros((1, 4), np.int32), {"num_steps": -1}, ValueError, "num_steps must be >= 0"),
    (np.zeros((1, 4), np.int32), {"stop_token_ids": [300]}, ValueError, "stop_token_ids must lie in"),
])
def test_bad_inputs_raise_clear_errors(reference, input_ids, options, error, message):
    options = {"init_scale": 0.0, **options}
    with pytest.raises(error, match=message):
        generate_minimal(reference.params, input_ids, config=reference.config, max_new_tokens=8, **options)


def test_dispatcher_routes_on_option_names_and_names_unknown_options(reference):
    from samplers import sampler_name

    assert sampler_name({"num_steps": 4}) == "generate_minimal"
    assert sampler_name({"criterion": "kl"}) == "generate_with_adaptive_compute"
    assert sampler_name({"exit_threshold": 0.1}) == "generate_with_adaptive_compute"
    assert sampler_name({"draft_steps": 4}) == "generate_speculative"
    assert sampler_name({"inner_recurrence": 4, "exit_t": 0.1}) == "generate_diffusion_style"
    prompt = np.zeros((1, 4), np.int32)
    with pytest.raises(TypeError, match=r"does not take the option\(s\) \['num_step'\]"):
        generate(reference.params, prompt, config=reference.config, max_new_tokens=2, num_step=3)
    with pytest.raises(TypeError, match=r"generate_with_adaptive_compute does not take the option\(s\) \['headway'\]"):
        generate(reference.params, prompt, config=reference.config, max_new_tokens=2, headway=1, criterion="kl")


def test_new_depth_or_sampling_values_do_not_recompile(reference):
    from samplers import autoregressive

    prompt = np.asarray([prompts_of_unequal_length(reference.config.vocab_size)[0]])
    options = dict(config=reference.config, max_new_tokens=4, cache_lookup_strategy="latest-m4-compress-s4",
                   key=jax.random.key(0), stop_token_ids=())
    generate_minimal(reference.params, prompt, num_steps=2, sampling=SamplingConfig(do_sample=True), **options)
    compiled = autoregressive._decode._cache_size()
    for steps, temperature, top_p in ((5, 0.5, 0.9), (9, 1.5, 1.0)):
        generate_minimal(reference.params, prompt, num_steps=steps, init_scale=0.5,
                         sampling=SamplingConfig(do_sample=True, temperature=temperature, top_p=top_p), **options)
    assert autoregressive._decode._cache_size() == compiled


def test_bfloat16_parameters_generate_and_keep_float32_logits(reference):
    params16 = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), reference.params)
    ids = reference.arrays["fwd1_input_ids"]
    out16 = forward(params16, ids, 8, config=reference.config, init_scale=0.0)
    out32 = forward(reference.params, ids, 8, config=reference.config, init_scale=0.0)
    assert out16.logits.dtype == np.float32 and out16.latents.dtype == jax.numpy.bfloat16
    # bfloat16 keeps ~3 significant digits; the logits of 8 recurrences agree to a few percent
    assert float(np.abs(out16.logits - out32.logits).max() / np.abs(out32.logits).max()) < 0.05
    result = generate_minimal(params16, ids, config=reference.config, max_new_tokens=4, init_scale=0.0)
    assert result.tokens.shape == (2, 4) and (result.tokens >= 0).all()
