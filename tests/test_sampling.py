"""Token choice against straightforward numpy versions of the reference's `_sample_next_token`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samplers.sampling import SamplingConfig, apply_repetition_penalty, filtered_probs_sorted, next_token


def numpy_repetition_penalty(logits, seen, penalty):
    out = logits.copy()
    for b in range(logits.shape[0]):
        for token in np.flatnonzero(seen[b]):
            value = logits[b, token]
            out[b, token] = value * penalty if value < 0 else value / penalty
    return out


def numpy_filtered_probs(logits, temperature, top_k, top_p, min_p):
    """One row at a time, in the reference's order: temperature, top-k, top-p, min-p, renormalise."""
    out = np.zeros_like(logits)
    for b, row in enumerate(logits.astype(np.float64)):
        z = row / temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if top_k:
            kth = np.sort(probs)[::-1][top_k - 1]
            probs = np.where(probs < kth, 0.0, probs)
        if top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            remove = cumulative > top_p
            remove[0] = False
            probs[order[remove]] = 0.0
        if min_p:
            probs = np.where(probs < min_p * probs.max(), 0.0, probs)
        out[b] = probs / max(probs.sum(), 1e-10)
    return out


def unsort(sorted_probs, order):
    probs = np.zeros_like(sorted_probs)
    np.put_along_axis(probs, order, sorted_probs, axis=-1)
    return probs


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05),
    (0.5, 20, 0.8, 0.1), (2.0, 5, 0.5, 0.0), (1.0, 1, 1.0, 0.0),
])
def test_filters_match_numpy(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(0).normal(size=(3, 300)).astype(np.float32) * 3
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, do_sample=True)
    sorted_probs, order = filtered_probs_sorted(jnp.asarray(logits), config)
    got = unsort(np.asarray(sorted_probs), np.asarray(order))
    np.testing.assert_allclose(got, numpy_filtered_probs(logits, temperature, top_k, top_p, min_p), atol=1e-6)


def test_repetition_penalty_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 50)).astype(np.float32)
    seen = rng.random((2, 50)) < 0.3
    got = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3)
    np.testing.assert_allclose(np.asarray(got), numpy_repetition_penalty(logits, seen, 1.3), rtol=1e-6)
    assert np.array_equal(np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.0)), logits)


def test_greedy_is_the_argmax_after_the_repetition_penalty():
    logits = jnp.asarray([[1.0, 3.0, 2.9, -1.0]])
    seen = jnp.asarray([[False, True, False, False]])
    assert int(next_token(jax.random.key(0), logits, seen, SamplingConfig())[0]) == 1
    assert int(next_token(jax.random.key(0), logits, seen, SamplingConfig(repetition_penalty=1.1))[0]) == 2


def test_samples_follow_the_filtered_distribution():
    logits = np.log(np.array([[0.4, 0.25, 0.2, 0.1, 0.05]], np.float32))
    config = SamplingConfig(top_p=0.8, do_sample=True, top_k=0)  # keeps 0.4, 0.25, 0.2 (cumsum 0.85 > 0.8 at 3rd)
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k: next_token(k, jnp.asarray(logits), jnp.zeros((1, 5), bool), config)[0])
    counts = np.bincount(np.asarray(draw(keys)), minlength=5) / len(keys)
    want = numpy_filtered_probs(logits, 1.0, 0, 0.8, 0.0)[0]
    assert counts[3] == counts[4] == 0
    np.testing.assert_allclose(counts, want, atol=0.015)


def test_invalid_values_are_named():
    with pytest.raises(ValueError, match="temperature must be > 0.0, got 0.0"):
        SamplingConfig(temperature=0.0, do_sample=True).validate()
    with pytest.raises(ValueError, match="top_p must be <= 1.0, got 1.5"):
        SamplingConfig(top_p=1.5).validate()
    with pytest.raises(ValueError, match="repetition_penalty must be > 0.0, got 0"):
        SamplingConfig(repetition_penalty=0).validate()
    with pytest.raises(ValueError, match=r"top_k must be an integer, got 2.7 \(float\)"):
        SamplingConfig(top_k=2.7).validate()
    with pytest.raises(ValueError, match="temperature must be a finite number, got nan"):
        SamplingConfig(temperature=float("nan")).validate()


def test_from_generation_config():
    config = SamplingConfig.from_generation_config({"do_sample": True, "temperature": 0.7, "eos_token_id": [1, 2]})
    assert config.do_sample and config.temperature == 0.7 and config.top_k == 50


def test_first_argmax_equals_argmax_with_ties():
    from samplers.sampling import first_argmax

    rng = np.random.default_rng(3)
    for values in (rng.normal(size=(7, 300)), rng.integers(0, 4, size=(7, 300)).astype(np.float64)):
        x = jnp.asarray(values, jnp.float32)
        np.testing.assert_array_equal(np.asarray(first_argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
