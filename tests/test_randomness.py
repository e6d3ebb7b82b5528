"""One randomness rule for every sampler: a row's random numbers depend on its key, the step and the
position, never on its row or its batch. Checked under sampling on a random model whose next-token
distribution is flat (so that sampling is really random), with random batches (hypothesis)."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from huginn_jax.config import TINY
from huginn_jax.model import forward
from huginn_jax.params import init_params
from samplers import SamplingConfig, generate

CONFIG = TINY.replace(vocab_size=64)
HOT = SamplingConfig(do_sample=True, temperature=1.0, top_k=0)
NEW_TOKENS = 6
SAMPLERS = {
    "ar": dict(num_steps=3),
    "adaptive": dict(num_steps=4, criterion="latent-diff", exit_threshold=0.5, cache_lookup_strategy="latest-m4"),
    "speculative": dict(num_steps=3, draft_steps=1, lookahead_for_draft=2),
    "diffusion": dict(num_steps=4, inner_recurrence=2, freeze_strategy="fixed", max_wavefront=8,
                      state_noise_mixing=0.5, headway=2),
}
# Every sampler's compiled programs take the cache's (donated) buffers as their outputs' buffers:
# JAX warns when a donated buffer finds no output to alias, and here that warning fails the test.
pytestmark = pytest.mark.filterwarnings("error:Some donated buffers were not usable:UserWarning")


@functools.lru_cache(maxsize=1)
def flat_model() -> dict:
    return init_params(CONFIG, jax.random.key(0))


def run(name: str, prompts, key) -> list[list[int]]:
    out = generate(flat_model(), prompts, config=CONFIG, sampler=name, max_new_tokens=NEW_TOKENS, sampling=HOT,
                   init_scale=1.0, stop_token_ids=(), key=key, **SAMPLERS[name])
    return out.sequences()


def test_the_model_is_flat_enough_for_sampling_to_be_random():
    logits = forward(flat_model(), np.arange(8)[None], 3, config=CONFIG, init_scale=0.0).logits[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    assert probs.max() < 0.2 and -(probs * np.log(probs)).sum() > 0.8 * np.log(CONFIG.vocab_size)


prompt_lists = st.lists(st.lists(st.integers(0, CONFIG.vocab_size - 1), min_size=1, max_size=8), min_size=2,
                        max_size=3)


@pytest.mark.parametrize("name", list(SAMPLERS))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=prompt_lists, seed=st.integers(0, 2**31 - 1))
def test_a_batch_gives_what_each_prompt_gives_alone(name, prompts, seed):
    key = jax.random.key(seed)
    batched = run(name, prompts, key)
    for i, prompt in enumerate(prompts):
        assert batched[i] == run(name, [prompt], key)[0], f"row {i} of {len(prompts)}"


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_identical_prompts_share_one_key_and_differ_with_one_key_per_row(name):
    prompts = [[1, 2, 3]] * 3
    shared = run(name, prompts, jax.random.key(5))
    assert shared[0] == shared[1] == shared[2] == run(name, prompts[:1], jax.random.key(5))[0]
    keys = jax.random.split(jax.random.key(5), 3)
    own = run(name, prompts, keys)
    assert len({tuple(row) for row in own}) == 3  # independent samples of the same prompt
    for i in range(3):  # and each row is that key's sample of the prompt alone
        assert own[i] == run(name, prompts[:1], keys[i][None])[0]


@pytest.mark.parametrize("key, message", [
    (3, "key must be a PRNG key"),
    ("seed", "key must be a PRNG key"),
    (np.zeros((2,), np.float32), "key must be a PRNG key"),
])
def test_keys_that_are_not_keys_are_named(key, message):
    with pytest.raises(ValueError, match=message):
        run("ar", [[1, 2]], key)


def test_one_key_per_row_must_match_the_batch():
    with pytest.raises(ValueError, match=r"one per row \(shape \[2\]\)"):
        run("ar", [[1, 2], [3]], jax.random.split(jax.random.key(0), 3))
