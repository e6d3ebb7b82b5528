"""The forward pass against the reference's golden logits and latents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.reference_check import run_case
from huginn_jax import model
from tests.conftest import reference_cases


@pytest.mark.parametrize("case", reference_cases("forward"), ids=lambda c: c["input_ids"])
def test_forward_case_within_relative_1e_5(reference, case):
    result = run_case(reference, case, rtol=1e-5)
    assert result.passed, result.detail


def test_changing_the_depth_does_not_recompile(reference):
    ids = reference.arrays["fwd0_input_ids"]
    model.forward(reference.params, ids, 2, config=reference.config, init_scale=0.0)
    compiled = model._forward._cache_size()
    for steps in (3, 7, 11):
        model.forward(reference.params, ids, steps, config=reference.config, init_scale=0.0)
    assert model._forward._cache_size() == compiled


def test_random_state_needs_a_key_and_depends_on_it(reference):
    ids = reference.arrays["fwd0_input_ids"]
    with pytest.raises(ValueError, match="pass a PRNG key"):
        model.forward(reference.params, ids, 2, config=reference.config)
    a = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(1)).logits
    b = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(1)).logits
    c = model.forward(reference.params, ids, 2, config=reference.config, key=jax.random.key(2)).logits
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_initial_state_has_the_reference_scale(reference):
    config = reference.config
    state = model.initial_state(config, jax.random.key(0), (64, 64, config.n_embd), 1.0, jnp.float32)
    # truncated normal (+-3 sigma) with sigma = sqrt(2/5): std 0.9866 sigma, bounded by 3 sigma
    sigma = np.sqrt(2 / 5)
    assert abs(float(state.std()) / (0.9866 * sigma) - 1) < 0.01
    assert float(jnp.abs(state).max()) <= 3 * sigma + 1e-6
    assert not jnp.any(model.initial_state(config, jax.random.key(0), (2, 3, 64), 0.0, jnp.float32))


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 5), np.float32), "integer dtype"),
    (np.zeros((5,), np.int32), "rank 1"),
    (np.zeros((1, 2, 5), np.int32), "rank 3"),
    (np.full((1, 5), 256), r"lie in \[0, 256\)"),
    (np.zeros((1, 257), np.int32), "exceed the model's context of 256"),
])
def test_bad_token_ids_are_rejected(reference, bad, message):
    with pytest.raises(ValueError, match=message):
        model.forward(reference.params, bad, 2, config=reference.config, init_scale=0.0)


def test_input_states_of_the_wrong_shape_are_rejected(reference):
    ids = reference.arrays["fwd0_input_ids"]
    with pytest.raises(ValueError, match="input_states has shape"):
        model.forward(reference.params, ids, 2, config=reference.config, input_states=jnp.zeros((2, 7, 32)))


def test_huginn_0125_shapes_trace_through_forward_and_decode():
    """The released model's shapes (3.5B, bfloat16) go through the whole forward pass (traced, not run)."""
    from huginn_jax.config import HUGINN_0125
    from huginn_jax.params import abstract_params

    params = abstract_params(HUGINN_0125, jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    out = jax.eval_shape(lambda p, i: model._forward(p, i, 32, config=HUGINN_0125, key=jax.random.key(0),
                                                     init_scale=1.0, input_states=None), params, ids)
    assert out.logits.shape == (2, 16, 65536) and out.logits.dtype == jnp.float32
    assert out.latents.shape == (2, 16, 5280) and out.latents.dtype == jnp.bfloat16


def test_trajectory_matches_the_reference_at_every_recorded_depth(reference):
    """One 16-step trajectory holds the reference's states after 1, 4, 8 and 16 steps: ln_f of
    entry d - 1 is its `latent_states` at depth d, and the logit lens decodes it to its logits."""
    ids = reference.arrays["fwd0_input_ids"]
    out = model.forward(reference.params, ids, 16, config=reference.config, init_scale=0.0, return_trajectory=True)
    assert out.trajectory.shape == (16, *ids.shape, reference.config.n_embd)
    lens = model.logit_lens(reference.params, out.trajectory, config=reference.config)
    assert lens.shape == (16, *ids.shape, reference.config.vocab_size)
    for depth in (1, 4, 8, 16):
        want_logits = reference.arrays[f"fwd0_steps{depth}_logits"]
        want_latents = reference.arrays[f"fwd0_steps{depth}_latents"]
        latents = model.rms_norm(out.trajectory[depth - 1], reference.params["ln_f"], reference.config.norm_eps)
        np.testing.assert_allclose(latents, want_latents, rtol=0, atol=1e-5 * np.abs(want_latents).max())
        np.testing.assert_allclose(lens[depth - 1], want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())


def test_recording_the_trajectory_changes_no_result(reference):
    ids = reference.arrays["fwd1_input_ids"]
    options = dict(config=reference.config, key=jax.random.key(7), init_scale=1.0)
    plain = model.forward(reference.params, ids, 5, **options)
    traced = model.forward(reference.params, ids, 5, return_trajectory=True, **options)
    assert plain.trajectory is None
    np.testing.assert_array_equal(traced.logits, plain.logits)
    np.testing.assert_array_equal(traced.latents, plain.latents)
    # the last entry is the final state: its ln_f is `latents`, its logit lens is `logits`
    np.testing.assert_array_equal(model.rms_norm(traced.trajectory[-1], reference.params["ln_f"],
                                                 reference.config.norm_eps), traced.latents)
    np.testing.assert_array_equal(model.logit_lens(reference.params, traced.trajectory[-1],
                                                   config=reference.config), traced.logits)


def test_trajectory_and_logit_lens_reject_what_they_cannot_shape(reference):
    ids = reference.arrays["fwd0_input_ids"]
    with pytest.raises(ValueError, match="return_trajectory needs an integer num_steps >= 1"):
        model.forward(reference.params, ids, 0, config=reference.config, init_scale=0.0, return_trajectory=True)
    with pytest.raises(ValueError, match=r"states must have shape \[..., batch, length, 64\]"):
        model.logit_lens(reference.params, np.zeros((7, 64), np.float32), config=reference.config)
